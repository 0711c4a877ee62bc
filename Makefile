# Two entry points, each self-sufficient on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test smoke install install-dev lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch==2.13.0 first when no torch is importable: it is the CPU build that lies on local disk;
# an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/mxprobe demo --out out/demo

# Three stages: the default tests; the slow ones (the full demo, multi-minute trainings, kill -9
# and resume, several processes (DDP, FSDP2), compiled transformers models), timed on their own
# (pytest prints the stage's seconds); then the installed wheel.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q --durations=15
	$(PY) -m pytest -q -m slow --durations=10
	$(MAKE) smoke

# The package as users install it: a wheel built from this tree, in a clean venv, run from
# outside the source tree (tests/smoke/installed.py, then the quick demo).
SMOKE := build/smoke
smoke: $(VENV)/.installed-dev
	# build/lib is setuptools' staging area: a module deleted from the tree must not ride along
	rm -rf $(SMOKE) build/lib && mkdir -p $(SMOKE)
	$(PIP) wheel -q --no-deps -w $(SMOKE)/wheel .
	python3 -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/pip install -q torch==2.13.0
	$(SMOKE)/venv/bin/pip install -q $(SMOKE)/wheel/mxprobe-*.whl
	cd /tmp && MXPROBE_CACHE_DIR=$(CURDIR)/$(SMOKE)/cache \
		$(CURDIR)/$(SMOKE)/venv/bin/python $(CURDIR)/tests/smoke/installed.py
	cd /tmp && MXPROBE_CACHE_DIR=$(CURDIR)/$(SMOKE)/cache \
		$(CURDIR)/$(SMOKE)/venv/bin/mxprobe demo --quick --out $(CURDIR)/$(SMOKE)/demo

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(VENV)/bin/mxprobe bench

clean:
	rm -rf $(VENV) build *.egg-info
