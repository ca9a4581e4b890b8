# Set-up and the two README commands. `make demo` and `make test` work on a fresh Linux machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
EXTRAS ?= dev,notebooks,faiss,export,quant,deepspeed,encoders,serve

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

# torch first (the CPU wheel), then everything else constrained to it so nothing pulls a CUDA build.
# GPU machines: `make setup TORCH=torch` after installing your own CUDA torch into .venv (see README).
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# The main job on the embedded default: baselines, a MiniLM two-tower on the synthetic dataset, and the trade-off
# table (dense, pruned, int8: NDCG@10 beside measured speed-up) with its figure in results/demo/.
demo: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/recsys baselines --config configs/synthetic.yaml
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/recsys train --config configs/synthetic.yaml tracking.overwrite=true
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python experiments/demo_tradeoff.py

# everything, end-to-end benchmark tests (marked slow) included: what .ci/run runs, with the local PostgreSQL
# server the sweep tests use started the same way (.ci/postgres.sh; one line says so where it cannot start)
test: setup
	RECSYS_TEST_POSTGRES=$$(.ci/postgres-or-skip.sh) WANDB_MODE=$${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 \
		$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# day-to-day: the suite without the slow end-to-end benchmark tests
test-fast: setup
	WANDB_MODE=$${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff, and import-linter's contracts in setup.cfg (the layers of recsys, no import cycles)
lint: setup
	$(BIN)/ruff check --line-length 120 --select E,F,W,I,B recsys tests experiments
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
