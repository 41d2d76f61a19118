# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Separate stamps: `make demo` installs only what the demo runs; `make test` (after it or alone)
# adds the test extras. The test install covers the demo's, so it stamps both.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test venv clean bench

venv: $(TEST_STAMP)

# Reinstall when the package metadata changes. torch/torchvision are pinned in pyproject.toml
# (they install from local disk here; an unpinned torch would download several GB).
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(DEMO_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

demo: $(DEMO_STAMP)
	$(VENV)/bin/ptxray demo

bench: $(DEMO_STAMP)
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info
