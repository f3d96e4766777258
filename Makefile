PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench bench-affinity bench-fleet bench-scale bench-soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/corral demo

test: $(STAMP)
	sh scripts/test-deps.sh
	$(BIN)/pytest -q -p no:cacheprovider

check: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

bench-affinity: $(STAMP)
	$(BIN)/python bench/affinity.py

bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py

bench-soak: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
