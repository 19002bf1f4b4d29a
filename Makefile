# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

# torch first, pinned, so that no extra pulls the CUDA build.
$(VENV)/.installed-%: pyproject.toml setup.py cellvae/_kernels.c | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-test
	$(BIN)/python -m cellvae.demo --out demo_output

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	CELLVAE_REQUIRE_KERNELS=1 $(BIN)/python -m pytest -q  # the install must have built _kernels.c

lint: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(VENV)/.installed-doc
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_output docs/_build build cellvae/_ckernels*.so
