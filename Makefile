# The targets the README and CI use. PYTHON may point at any interpreter >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
# Test workers (pytest-xdist). The whole suite: 4 on 2 cores, as one worker runs the Slurm tests and one the Ray
# tests, which mostly wait (WAITING_FILES in tests/conftest.py), beside two that compute (5 measured slower: the
# cores are the limit). The fast set only computes: 2.
test: TEST_WORKERS ?= 4
test-times: TEST_WORKERS ?= 4
test-fast: TEST_WORKERS ?= 2
XDIST   = -n $(TEST_WORKERS) --no-loadscope-reorder

.PHONY: setup train test test-fast test-times lint format typecheck bench clean

$(BIN)/fmtrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: an open-ended requirement can pull a multi-GB CUDA build.
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/fmtrain

train: setup
	$(BIN)/fmtrain train $(ARGS)

test: setup lint
	$(BIN)/python -m pytest -q -ra $(XDIST) $(PYTEST_ARGS)

# Where the suite's time goes: the whole suite with a JUnit report, then its tables (tests/times.py).
test-times: setup
	$(BIN)/python -m pytest -q $(XDIST) --junitxml=.cache/test-times.xml $(PYTEST_ARGS) || true
	$(BIN)/python tests/times.py .cache/test-times.xml

test-fast: setup
	$(BIN)/python -m pytest -q -ra $(XDIST) -m "not slow and not slurm and not ray and not root" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
