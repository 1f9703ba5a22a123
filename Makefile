# pdp: the two commands a user needs are `make run` and `make test`.
# Each creates or reuses the virtual environment in .venv itself.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint check venv clean-data loadtest

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "pdp needs Python >= 3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[fast,test,lint,load]'
	@touch $(STAMP)

venv: $(STAMP)

## Migrate, load the demo tenant and start the sidecar (embedded PostgreSQL unless PDP_DATABASE_URL is set).
run: $(STAMP)
	$(BIN)/pdp migrate
	$(BIN)/pdp seed --demo --replace
	$(BIN)/pdp serve

## The whole test suite, against a real PostgreSQL (and Redis where a test needs it).
test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check pdp sync migrations tests loadtests deploy
	$(BIN)/mypy
	$(BIN)/lint-imports

check: lint test

## Load test: make loadtest PROFILE=smoke|standard|seed-target|soak (results in loadtests/results/).
PROFILE ?= smoke
loadtest: $(STAMP)
	$(BIN)/python -m loadtests.run --profile $(PROFILE) $(LOADTEST_ARGS)
