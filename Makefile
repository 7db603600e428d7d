# Every target creates the virtualenv on first use; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_PORT ?= 8765

.PHONY: venv demo test test-fast test-integration lint router clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: sample data + bundled mock provider + jobs/demo.toml on local Ray
demo: $(STAMP)
	$(BIN)/batchroute sample --out runs/demo-input/prompts.parquet --rows 20000
	@set -e; \
	$(BIN)/batchroute mock-provider --port $(DEMO_PORT) --rpm 3000 --tpm 2000000 \
	    --latency-ms 250 --fail-rate 0.01 --api-key-env BATCHROUTE_DEMO_KEY > runs/mock-provider.log 2>&1 & \
	mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT; \
	$(BIN)/batchroute mock-provider --wait-ready --port $(DEMO_PORT); \
	BATCHROUTE_DEMO_KEY=$${BATCHROUTE_DEMO_KEY:-sk-demo-not-a-real-key} \
	    $(BIN)/batchroute run jobs/demo.toml

## test: every tier (unit, integration on one local Ray session, slow)
test: $(STAMP)
	$(BIN)/pytest -q tests

## test-fast: unit tests only, no Ray, no network (seconds)
test-fast: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check batchroute tests
	$(BIN)/mypy

## router: retrain the bundled router from ../shared/data (deterministic)
router: $(STAMP)
	$(BIN)/batchroute train --labels ../shared/data/mmlu_labels.parquet --out batchroute/assets/router.onnx

clean:
	rm -rf $(VENV) runs test-artifacts
