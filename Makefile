# Every target creates the virtualenv on first use; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_PORT ?= 8765

.PHONY: venv demo test test-fast test-integration lint router router-embed router-kinds browser clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: sample data + bundled mock provider + jobs/demo.toml on local Ray
# The mock enforces 6,000 RPM per model over 10 s windows, and only 3,000 RPM for gpt-4 whose
# catalog entry claims 3,600: the demo shows the client limiter pacing every model, and gpt-4
# slowed to the provider's 3,000 from its rate-limit headers before any 429.
demo: export BATCHROUTE_DEMO_KEY ?= sk-demo-not-a-real-key
demo: $(STAMP)
	mkdir -p runs
	$(BIN)/batchroute sample --out runs/demo-input/prompts.parquet --rows 20000
	@set -e; \
	$(BIN)/batchroute mock-provider --port $(DEMO_PORT) --rpm 6000 --tpm 20000000 --window-s 10 \
	    --model-limit gpt-4-1106-preview=3000:4000000 --latency-ms 250 --fail-rate 0.01 \
	    --api-key-env BATCHROUTE_DEMO_KEY > runs/mock-provider.log 2>&1 & \
	mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT; \
	$(BIN)/batchroute mock-provider --wait-ready --port $(DEMO_PORT); \
	$(BIN)/batchroute run jobs/demo.toml

## test: lint, then every tier (unit, integration on one local Ray session, slow)
test: lint browser
	$(BIN)/pytest -q tests

## browser: Debian's chromium, for the test that renders the report page headless. Installed
# with apt-get where this runs as root; elsewhere that one test is skipped (and fails in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "chromium not installed: the report's browser test will be skipped"

## test-fast: unit tests only, no Ray, no network (seconds)
test-fast: $(STAMP)
	$(BIN)/pytest -q tests/unit -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check batchroute tests
	$(BIN)/mypy

## router: retrain the bundled router from ../shared/data (deterministic)
router: $(STAMP)
	$(BIN)/batchroute train --labels ../shared/data/mmlu_labels.parquet --out batchroute/assets/router.onnx

## router-embed: the MiniLM-embedding router for comparison (~90 MB, never committed: runs/)
router-embed: $(STAMP)
	$(BIN)/batchroute train --features embed --labels ../shared/data/mmlu_labels.parquet \
	    --out runs/router-embed.onnx

## router-kinds: the README's comparison of router kinds on the held-out MMLU labels. Builds
# the similarity router's memory bank from the training split (minutes: MiniLM on the CPU),
# starts the mock provider for the llm kind (its quality is simulated), evaluates every file
# of jobs/router-kinds/.
router-kinds: export BATCHROUTE_DEMO_KEY ?= sk-demo-not-a-real-key
router-kinds: $(STAMP)
	mkdir -p runs/memory
	test -f runs/memory/mmlu-bank.parquet || $(BIN)/batchroute memory add \
	    --bank runs/memory/mmlu-bank.parquet --labels ../shared/data/mmlu_labels.parquet --split train
	@set -e; \
	$(BIN)/batchroute mock-provider --port $(DEMO_PORT) --rpm 60000 --tpm 50000000 --latency-ms 50 \
	    --api-key-env BATCHROUTE_DEMO_KEY > runs/mock-provider-kinds.log 2>&1 & \
	mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT; \
	$(BIN)/batchroute mock-provider --wait-ready --port $(DEMO_PORT); \
	$(BIN)/batchroute eval --labels ../shared/data/mmlu_labels.parquet \
	    $(foreach f,$(sort $(wildcard jobs/router-kinds/*.toml)),--router-config $(f)) $(EVAL_FLAGS)

clean:
	rm -rf $(VENV) runs test-artifacts
