# diagvi — `make help` lists the targets.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; GPU users: make install TORCH="torch"
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.=\n' _)
ARGS    ?=

.PHONY: help install demo test sweep bench bench-install bench-scale lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv: torch first (pinned CPU build), then diagvi[dev]

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: install ## train on the embedded CITE-seq demo; prints FOSCTTM and where the outputs are
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m diagvi.train trainer.enable_progress_bar=false $(ARGS)

test: install ## run the test suite (offline, CPU)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

sweep: install ## a short Optuna study (Hydra sweeper) on the demo data, then its report
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m diagvi.train --multirun hparams_search=diagvi_optuna \
		trainer.enable_progress_bar=false hydra.sweep.dir=multirun/sweep_demo $(ARGS)
	$(PY) -m diagvi.report multirun/sweep_demo

REF_VENV ?= .venv-ref
bench-install: ## create $(REF_VENV) with scvi-tools 1.5.1 (the reference DIAGVI)
	bash experiments/benchmark/install_reference.sh $(REF_VENV) "$(TORCH)"

bench: install ## benchmark vs joint PCA and scvi-tools DIAGVI (QUICK=1: one seed, small data)
	test -x $(REF_VENV)/bin/python || $(MAKE) bench-install
	WANDB_MODE=disabled $(PY) experiments/benchmark/run.py --ref-python $(REF_VENV)/bin/python \
		$(if $(QUICK),--quick) $(ARGS)

N ?= 100000
bench-scale: install ## train one epoch from disk at N cells per modality (N=100000): cells/s, peak RSS
	WANDB_MODE=disabled $(PY) experiments/scale/run.py --n-cells $(N) $(ARGS)

lint: install ## ruff lint and format check
	$(PY) -m ruff check diagvi tests experiments
	$(PY) -m ruff format --check diagvi tests experiments

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix diagvi tests experiments
	$(PY) -m ruff format diagvi tests experiments

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
