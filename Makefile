# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds a local virtual environment (.venv) first; torch is installed before the
# package so the pinned CPU build is used rather than a newer build with CUDA.
#   make demo   installs sparsenets with the experiment stack and runs `sparsenets demo`
#   make test   also installs the test and lint tools, then runs `make lint` and the tests
#   make lint   ruff and mypy only

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
LINT_PATHS := src tests bench examples

.PHONY: demo test lint clean

$(VENV)/.torch:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	touch $@

$(VENV)/.installed-demo: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e ".[experiments]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e ".[experiments,test,dev]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/sparsenets demo

# Both checkers always run, so one CI log shows every finding; either failing fails the target.
lint: $(VENV)/.installed-test
	@status=0; \
	echo "ruff check $(LINT_PATHS)"; $(VENV)/bin/ruff check $(LINT_PATHS) || status=1; \
	echo "mypy src/sparsenets"; $(VENV)/bin/mypy src/sparsenets || status=1; \
	exit $$status

# pytest exits 5 when it collects no tests; make treats that, like any failure, as an error.
test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
