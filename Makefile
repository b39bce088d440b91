# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make demo   — run the default recipe end to end (recipes/tiny.yaml)
#   make test   — the whole test suite (what CI runs)
# Each creates or reuses .venv; it is rebuilt only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"engine needs Python 3.11, found {sys.version}"'
	# The CPU torch pin goes first: a looser spec from any dependency could pull a CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/engine run recipes/tiny.yaml

lint: $(STAMP)
	$(BIN)/engine schema --check
	$(BIN)/ruff check .
	$(BIN)/mypy

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: lint
	@$(BIN)/pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
