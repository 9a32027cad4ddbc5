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
CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser test demo lab bench clean

# The venv sees the base interpreter's site-packages, so a torch that is already installed
# (a Kaggle/Lambda image, a conda env) is reused instead of downloading another one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the JupyterLab browser test (Playwright drives it; it cannot download its own here).
# Without root or sudo it is skipped, and so is that test, with the reason.
browser:
	@if [ -x "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
		echo "browser: no root or sudo to install chromium; the browser test will be skipped"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null 2>&1; $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
		echo "browser: could not install chromium; the browser test will be skipped"

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m nbgpt run --preset $(PRESET)

# JupyterLab over the repository: notebooks/ to explore (their run_dir, ../runs/default, is the repo's runs/)
# and runs/ with the executed notebooks of `make demo`. Jupyter refuses to run as root (a container, a rented
# GPU box) unless told it is meant to.
LAB_ARGS ?=
lab: install
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --FileContentsManager.preferred_dir=notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Every benchmark in turn (about 20 minutes on 2 cores); each prints JSON and a table, see bench/RESULTS.md.
BENCHES ?= data_throughput generate_speed hellaswag_speed cpu_train_throughput gpt2_throughput cpu_time_to_quality
bench: install
	cd bench && for name in $(BENCHES); do ../$(PY) $$name.py || exit 1; done

clean:
	rm -rf $(VENV) runs bench/out
