# Two commands for a newcomer: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra arguments for `tinkerbell serve`, e.g. make serve ARGS="--model /path/to/hf-folder --port 8080"
ARGS   ?=
# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k sampling -x"
PYTEST_ARGS ?=
# The Triton kernels' tests run through Triton's CPU interpreter (no GPU needed) with this Triton, installed
# into its own folder so it never touches the venv's torch (a CUDA torch pins its own Triton).
TRITON_INTERP_PIN ?= triton==3.6.0
TRITON_INTERP_DIR ?= .triton-interp
KERNEL_TESTS := tests/engine/test_kernels.py tests/engine/test_segment_matmul.py tests/engine/test_fused_layer.py tests/engine/test_llada_model.py \
	tests/engine/test_train_ops.py

.PHONY: install serve test test-kernels clean

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
	$(MAKE) test-kernels

test-kernels: install
	@[ -f $(TRITON_INTERP_DIR)/.installed ] || { $(BIN)/python -m pip install --quiet --no-deps \
		--target $(TRITON_INTERP_DIR) $(TRITON_INTERP_PIN) && touch $(TRITON_INTERP_DIR)/.installed; }
	TRITON_INTERPRET=1 PYTHONPATH=$(TRITON_INTERP_DIR) $(BIN)/python -m pytest -q $(KERNEL_TESTS)

clean:
	rm -rf $(VENV) $(TRITON_INTERP_DIR) .pytest_cache build *.egg-info
