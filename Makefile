# make demo: create .venv, install, run the main job on the embedded default corpus.
# make test: create .venv if missing, install, run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# GPU machines (nvidia-smi present) keep whatever torch the environment provides.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

DEMO_DATA := .cache/data/stdlib

$(DEMO_DATA)_text_document.idx: | $(VENV)/.installed
	$(PY) tools/preprocess_data.py --input python-stdlib --output-prefix $(DEMO_DATA) --tokenizer byte --overwrite

demo: install $(DEMO_DATA)_text_document.idx
	rm -rf runs/demo-pretrain
	$(PY) -m elastic_megatron.train --config-name=pretrain model=tiny run.dir=runs/demo-pretrain
	$(PY) -c "import torch; from elastic_megatron.data.datasets import read_tokens; from elastic_megatron.data.stdlib_corpus import unigram_entropy_nats as h; \
	print(f'unigram entropy of the demo corpus: {h(torch.from_numpy(read_tokens(\"$(DEMO_DATA)_text_document\").astype(\"int64\")), 257):.4f} nats (validation loss above should be well below it)')"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm"

clean:
	rm -rf $(VENV) .pytest_cache .cache runs/demo-*
