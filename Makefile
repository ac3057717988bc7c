# diagvi — `make help` lists the targets.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; GPU users: make install TORCH="torch"
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'a-zA-Z0-9.=\n' _)
ARGS    ?=

.PHONY: help install demo test lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

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

lint: install ## ruff lint and format check
	$(PY) -m ruff check diagvi tests experiments
	$(PY) -m ruff format --check diagvi tests experiments

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix diagvi tests experiments
	$(PY) -m ruff format diagvi tests experiments

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
