# The two commands: `make demo` and `make test`. Both create .venv when missing.
# `make demo` installs lumenvq alone; `make test` and `make bench` add the test extras
# (pytest, and the references: transformers + torch for the HF parity test, faiss).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint format bench clean

# jax (with jaxlib, whose FFI headers setup.py compiles the CPU kernel against) and a
# setuptools that builds wheels itself (70.1+) go in first, so the build runs in .venv:
# an isolated build env would fetch jaxlib a second time.
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "setuptools>=70.1" jax
	$(PY) -m pip install --no-build-isolation -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --no-build-isolation -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m lumenvq.demo

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 tests

# One code style (pyink, configured in pyproject.toml): `make format` applies it, `make lint`
# checks it (CI runs it before the tests).
lint: $(TEST_STAMP)
	$(PY) -m pyink --check --quiet .

format: $(TEST_STAMP)
	$(PY) -m pyink --quiet .

bench: $(TEST_STAMP)
	for b in $(filter-out benchmarks/report.py,$(wildcard benchmarks/*.py)); do \
	  $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out
