# make demo: create .venv, install, run the main job on the embedded default corpus.
# make test: create .venv if missing, install, run the test suite (Python 3.11 leg).
# make test-312: the Python 3.12 + newest Megatron-Core 0.19.x leg in its own .venv312.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# GPU machines (nvidia-smi present) keep whatever torch the environment provides.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
# The default leg's Megatron-Core: 0.16.1, the newest release with Python 3.11 wheels.
MCORE_SPEC ?= megatron-core==0.16.1

# Second leg: Megatron-Core 0.17+ publish Python 3.12 wheels only. PYTHON312 is the first of:
# the variable as given, python3.12 on PATH, pyenv's newest 3.12.x.
PYTHON312 ?= $(shell for c in python3.12 "$$(pyenv prefix $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$$)' | tail -n 1) 2>/dev/null)/bin/python3.12"; do \
	"$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 && { command -v "$$c"; break; }; done)
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
# On Python 3.12 the registry's torch 2.13.0 is a CUDA build (it runs on the CPU).
TORCH312_SPEC ?= torch==2.13.0
MCORE312_SPEC ?= megatron-core>=0.19,<0.20
# pytest arguments of the 3.12 leg (see docs/install.md: what it leaves out and why).
TEST312_ARGS ?= -m "not slurm and not kernels and not gpu_rehearsal"
# The Triton-interpreter leg (make test-kernels): mamba-ssm's Python sources (its CUDA extensions
# are not compiled) and the Triton that torch 2.13's CUDA build requires, i.e. what a GPU machine
# with that torch runs (Triton 3.9 removed the block pointers ModelOpt 0.47's NVFP4 kernel uses).
KERNELS_TRITON_SPEC ?= triton==3.7.1
MAMBA_SPEC ?= mamba-ssm==2.3.2.post1

.PHONY: install install-312 install-kernels demo docs test test-312 test-fast test-kernels gpu-check gpu-check-rehearsal bench-recompute bench-fidelity clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(MCORE_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV312)/.installed: pyproject.toml
	@if [ -z "$(PYTHON312)" ]; then \
		echo "error: no Python 3.12 found (tried python3.12 on PATH and pyenv); install one or run make test-312 PYTHON312=/path/to/python3.12" >&2; \
		exit 2; fi
	$(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q "$(TORCH312_SPEC)" "$(MCORE312_SPEC)"
	$(PY312) -m pip install -q -e ".[test]"
	touch $@

install-312: $(VENV312)/.installed

$(VENV)/.kernels-installed: $(VENV)/.installed
	$(PY) -m pip install -q "$(KERNELS_TRITON_SPEC)" "einops>=0.8"
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(PY) -m pip install -q --no-build-isolation --no-deps "$(MAMBA_SPEC)"
	touch $@

install-kernels: $(VENV)/.kernels-installed

install: $(VENV)/.installed

DEMO_DATA := .cache/data/stdlib

$(DEMO_DATA)_text_document.idx: | $(VENV)/.installed
	$(PY) tools/preprocess_data.py --input python-stdlib --output-prefix $(DEMO_DATA) --tokenizer byte --overwrite

# The whole method on the embedded corpus: pretrain a tiny parent, score and sort it,
# elastic distillation stage 1 (uniform budgets) and stage 2 (0.5/0.3/0.2, longer
# sequences), a short nested NVFP4 QAD, the evaluation tables (against the two
# no-training baselines; per budget x precision: BF16, FP8/NVFP4 PTQ, NVFP4 after QAD), then
# the smallest budget sliced out as a standalone Megatron + HF checkpoint in BF16 and in
# NVFP4 (ModelOpt's unified HF format), the storage report,
# text generated at the smallest and the full budget and with elastic budget control
# (the small budget writes the class header, the full one its body), and last the shipped
# downstream tasks through lm-evaluation-harness and tools/serve.py (every budget against
# the untrained sorted slices, in BF16 and with the QAD run's NVFP4 scales), next to the
# held-out losses.
TRAIN := $(PY) -m elastic_megatron.train
# A 287K-parameter byte model loops when greedy, and after a newline at temperature 0.8 it
# writes nothing but indentation: the demo samples at temperature 1 (top-p 0.95, fixed seed).
SAMPLE := --temperature 1.0 --top-p 0.95 --seed 1
demo: install $(DEMO_DATA)_text_document.idx
	rm -rf runs/demo-pretrain runs/demo-importance runs/demo-stage1 runs/demo-stage2 runs/demo-qad runs/demo-eval runs/demo-small runs/demo-small-nvfp4 runs/demo-tasks
	$(TRAIN) --config-name=pretrain model=tiny run.dir=runs/demo-pretrain
	$(PY) -c "import torch; from elastic_megatron.data.datasets import read_tokens; from elastic_megatron.data.stdlib_corpus import unigram_entropy_nats as h; \
	print(f'unigram entropy of the demo corpus: {h(torch.from_numpy(read_tokens(\"$(DEMO_DATA)_text_document\").astype(\"int64\")), 257):.4f} nats (validation loss above should be well below it)')"
	$(TRAIN) --config-name=importance_tiny elastic.parent_checkpoint=runs/demo-pretrain run.dir=runs/demo-importance
	$(TRAIN) --config-name=stage1_tiny elastic.teacher_checkpoint=runs/demo-importance run.dir=runs/demo-stage1
	$(TRAIN) --config-name=stage2_tiny elastic.teacher_checkpoint=runs/demo-importance \
		elastic.init_checkpoint=runs/demo-stage1 run.dir=runs/demo-stage2
	$(TRAIN) --config-name=qad_tiny elastic.teacher_checkpoint=runs/demo-stage2 run.dir=runs/demo-qad
	$(PY) tools/evaluate_elastic.py --checkpoint runs/demo-stage2 --sorted runs/demo-importance \
		--unsorted runs/demo-pretrain --out runs/demo-eval --qad runs/demo-qad
	$(PY) tools/zero_shot_slicing.py --source-checkpoint runs/demo-stage2 --target-checkpoint runs/demo-small \
		--size small --precision bf16 --format both
	$(PY) tools/zero_shot_slicing.py --source-checkpoint runs/demo-qad --target-checkpoint runs/demo-small-nvfp4 \
		--size small --precision nvfp4 --format both
	$(PY) tools/describe_model.py storage=true checkpoint=runs/demo-stage2
	@echo "--- generation from the elastic checkpoint: the smallest budget, the full model, then budget control"
	$(PY) tools/generate.py --checkpoint runs/demo-stage2 --budget small --prompt "def __init__(self" --max-new-tokens 160 $(SAMPLE)
	$(PY) tools/generate.py --checkpoint runs/demo-stage2 --budget full --prompt "def __init__(self" --max-new-tokens 160 $(SAMPLE)
	$(PY) tools/generate.py --checkpoint runs/demo-stage2 --think-budget small --answer-budget full \
		--prompt "class Parser" --delimiter ":" --max-think-tokens 60 --max-new-tokens 160 $(SAMPLE)
	@echo "--- downstream tasks (lm-evaluation-harness through tools/serve.py): every budget in BF16 and NVFP4 (the QAD run's scales) next to the untrained sorted slices"
	@# TQDM_DISABLE: lm-eval's per-request progress bars; the tool prints a line per budget and task
	TQDM_DISABLE=1 $(PY) tools/evaluate_tasks.py --checkpoint runs/demo-stage2 --sorted runs/demo-importance \
		--qad runs/demo-qad --precisions bf16,nvfp4 \
		--tasks stdlib_cloze,stdlib_identifier,stdlib_assign --out runs/demo-tasks
	@echo "--- held-out loss per budget (runs/demo-eval) next to the task scores above"
	@$(PY) -c "import json; rows = json.load(open('runs/demo-eval/evaluation.json'))['rows']; \
	[print(f\"{r['model']:9} {r['budget']:7} loss {r['loss']:.4f}  ppl {r['ppl']:7.3f}\") for r in rows]"

# The documentation site (mkdocs + Material) into site/; the CLI and recipe-schema references are
# generated from the code during the build (docs/gen_reference.py). --strict: a broken link or a
# page missing from the nav fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Two pytest runs: everything but the kernels, then the kernels leg (TRITON_INTERPRET must be set
# before Python starts, so it cannot share the first run's process).
test: install install-kernels
	$(PY) -m pytest -q --durations=15 -m "not kernels"
	$(MAKE) --no-print-directory test-kernels

# The GPU branch on CPU: mamba_ssm's Triton scan, decode step and gated norm, and ModelOpt's NVFP4
# kernel, run by Triton's interpreter against the PyTorch paths (tests/test_kernels.py).
test-kernels: install-kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=5 -m kernels

# The GPU acceptance run (tools/gpu_check.py) on a fresh H100/H200 machine, in the Python environment
# it finds (a container's, or GPU_PY=...): the gpu extra installed (GPU_WHEELS=DIR: from wheels built
# elsewhere, no index, as docs/gpu.md shows), then every stage; the report folder is
# GPU_CHECK_OUT. gpu-check-rehearsal: the same sequence on CPU at tiny sizes (CI runs it in tests/test_gpu_check.py).
GPU_PY ?= python3
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
ifdef GPU_WHEELS
	$(GPU_PY) -m pip install -q --no-index --no-deps $(GPU_WHEELS)/*.whl
else
	$(GPU_PY) -m pip install -q -e ".[gpu]"
endif
	$(GPU_PY) tools/gpu_check.py --out $(GPU_CHECK_OUT)

gpu-check-rehearsal: install install-kernels
	$(PY) tools/gpu_check.py --rehearse --out runs/gpu-check-rehearsal

# The default leg's venv is installed too: tests/test_versions.py resumes runs across the two
# Megatron-Core versions, half in each interpreter.
test-312: install install-312
	$(PY312) -c "from megatron.core import package_info as p; import sys; print(f'python {sys.version.split()[0]}, megatron-core {p.__version__}')"
	ELASTIC_MEGATRON_OTHER_PYTHON=$(abspath $(PY)) $(PY312) -m pytest -q --durations=15 $(TEST312_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow and not slurm and not kernels"

# Step time and kept activations of each trainer.recompute mode, one run (the script's docstring);
# e.g. make bench-recompute BENCH_ARGS="--model small --seq 4096 --json runs/recompute.json"
bench-recompute: install
	$(PY) benchmarks/activation_recompute.py $(BENCH_ARGS)

# The nested models of one elastic run vs separately distilled students of the same sizes, on
# held-out English text (the shipped tinyshakespeare, read in place), with tokens and FLOPs per method
# (the script's docstring); e.g. make bench-fidelity BENCH_ARGS="--scale 0.25 --out runs/fidelity-quick"
bench-fidelity: install
	$(PY) benchmarks/fidelity.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .cache runs/demo-* site
