# deepmetric: `make test` and `make demo` work on a fresh clone (Python 3.11, pip).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[all,test,app]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src benchmarks conftest.py
	$(BIN)/ruff format --check src benchmarks conftest.py
	$(BIN)/mypy src/deepmetric

# Chromium (Debian's package) for the test that renders the HTML report; installed where
# missing, with apt-get as root or through sudo. Elsewhere that test is skipped, unless CI is set.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "chromium is missing and cannot be installed here (needs root): the report's browser test is skipped"; \
	fi

# The whole suite once per backend; each run stops the build if it fails. On JAX, XLA's
# optimisation passes are off (JAX_FAST_COMPILE=false keeps them): the suite compiles many
# small programs once each, so compiling is most of its work; results are compared within
# tolerances, and `benchmarks/losses.py --check` checks the optimised programs.
JAX_FAST_COMPILE ?= true
test: install lint browser
	@for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend ==="; \
		KERAS_BACKEND=$$backend JAX_DISABLE_MOST_OPTIMIZATIONS=$(JAX_FAST_COMPILE) \
			$(BIN)/python -m pytest -q -n 2 --doctest-modules src tests $(PYTEST_ARGS) || exit 1; \
	done

demo: install
	$(BIN)/deepmetric train

# Each backend's table, then one table with a column group per backend.
bench: install
	$(BIN)/python benchmarks/losses.py --backends jax,tensorflow,torch

clean:
	rm -rf $(VENV) runs
