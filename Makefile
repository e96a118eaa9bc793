# softcnn — developer commands. `make demo` and `make test` build .venv from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch is installed first, pinned, so the package's own `torch>=2.2` installs nothing more.
# Where pip is offered a local CPU wheel (PIP_FIND_LINKS, as on these machines) it takes it;
# where it would only see CUDA builds, set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test docs bench clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	touch $@

demo: venv
	$(BIN)/python -m softcnn.demo

test: venv
	$(BIN)/python -m pytest -q

docs: venv
	$(BIN)/python -m pip install -q -e ".[docs]"
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: venv
	$(BIN)/python benchmarks/bench_fit.py

clean:
	rm -rf $(VENV) docs/_build docs/auto_examples build *.egg-info
