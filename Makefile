# Two commands for a newcomer: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra arguments for `tinkerbell serve`, e.g. make serve ARGS="--model /path/to/hf-folder --port 8080"
ARGS   ?=
# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k sampling -x"
PYTEST_ARGS ?=

.PHONY: install serve test clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

serve: install
	$(BIN)/tinkerbell serve $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
