# nbgpt — two commands: `make demo` (CPU pipeline end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build installed when the environment has none. On a CPU-only box pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to skip the CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PRESET ?= cpu-demo
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

# The venv sees the base interpreter's site-packages, so a torch that is already installed
# (a Kaggle/Lambda image, a conda env) is reused instead of downloading another one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m nbgpt run --preset $(PRESET)

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs bench/out
