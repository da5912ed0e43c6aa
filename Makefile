# make quickstart   fresh machine -> venv, install, prepare the embedded corpus, train, sample
# make test         fresh machine -> venv, install with dev extras, run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch>=2.4
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup setup-dev quickstart test test-fast lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .

setup-dev: setup
	$(PY) -m pip install -q -e ".[dev]"

quickstart: setup
	@test -f data/stdlib/meta.json || $(VENV)/bin/dsfm prepare --input stdlib --out data/stdlib \
		--vocab-size 4096 --max-bytes 8000000
	$(VENV)/bin/dsfm train --config configs/smoke.yaml
	$(VENV)/bin/dsfm generate runs/smoke --prompt "class" --max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0
	$(VENV)/bin/dsfm generate runs/smoke --prompt "The" --max-new-tokens 80 --temperature 0.8 --top-k 50 --seed 0

test: setup-dev
	$(PY) -m pytest tests -q -ra --durations=15

test-fast: setup-dev
	$(PY) -m pytest tests/unit -q

lint: setup-dev
	$(VENV)/bin/ruff check dsfm launchers tests

clean:
	rm -rf runs data .pytest_cache
