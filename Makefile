# Two entry points on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded shapes world
#   make test   set up .venv and run the lint and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean pretrain

setup: $(STAMP)

$(STAMP): requirements/cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements/cpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The main job: AWM, the preset that learned fastest in the 30-minute comparison (docs/benchmarks.md),
# from the shipped base on the shapes world (about 10 minutes on 2 cores); prints the before/after
# accuracy table and writes runs/demo/{curve.png,metrics.jsonl,samples/,final/}.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/tempflow train --config configs/shapes/awm.yaml --out runs/demo --set max_minutes=8

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests; the suite is broken"; exit 1; fi; \
	exit $$rc

pretrain: $(STAMP)
	$(BIN)/tempflow pretrain --config configs/shapes/pretrain.yaml --out runs/pretrain

clean:
	rm -rf $(VENV) runs
