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
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tempflow eval --model shapes-base --prompts shapes-eval --out runs/demo/base_metrics.json --grid runs/demo/base_grid.png
	$(BIN)/tempflow sample --model shapes-base --prompt "a red circle to the left of a blue square" --prompt "three green triangles" --num 4 --out runs/demo/samples

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
