"""The GPU acceptance run: one command on a fresh H100/H200 machine that runs every GPU branch
once, end to end, and writes what happened and what it measured into one folder.

    python tools/gpu_check.py --out runs/gpu-check            # on the GPU (make gpu-check)
    python tools/gpu_check.py --rehearse --out runs/gpu-check # the same sequence on CPU, tiny sizes

Stages, in order (each a subprocess with its own time budget, its log in `logs/`; a failed or
timed-out stage is recorded and the run goes on, so one slot of GPU time shows every failure):

  environment   versions of torch, CUDA, Triton, mamba_ssm, Megatron-Core, ModelOpt, TE; the GPU
  pytest-gpu    `pytest -m gpu` (Triton scan/decode vs PyTorch on CUDA, CUDA graphs, ModelOpt CUDA)
  data          the embedded corpus tokenized (tools/preprocess_data.py)
  pretrain .. qad   the chain of `make demo` on the `small` preset in bf16: pretrain,
                importance + sorting, stage 1, stage 2, NVFP4 QAD (Megatron DDP and its
                distributed optimizer in bf16, the Triton kernels)
  resume        stage 1 continued for a few steps from its own checkpoint (bf16 resume)
  slice-bf16, slice-nvfp4   the smallest budget sliced out, Megatron + HF formats
  generate      budget control with tools/generate.py (small thinks, full answers)
  serve         tools/serve.py answering one request per budget and one with budget control
  train-4k      a `small` pretraining run at 4K sequences: tokens/s, MFU, peak memory, and the
                memory estimate (parallel/memory.py) for the same layout
  scan-kernels  benchmarks/model_throughput.py: Triton SSD vs the PyTorch SSD, same model
  elastic-step  benchmarks/elastic_overhead.py: elastic distillation step vs plain distillation
  decode        benchmarks/generation.py: decode tokens/s per budget at batch 1 and 32

`report.json` (every stage: status, seconds, budget, command, figures) and `report.md` (the
same as tables) are rewritten after each stage, so a run cut short still leaves its report.
`--rehearse` runs the identical sequence on CPU at tiny sizes (fp32; `pytest -m gpu` collected
and skipped; the chain and the benchmarks on the PyTorch paths, since the GPU branch of the
kernels runs in the Triton-interpreter leg, `make test-kernels`): CI runs it so this script
cannot rot; its figures are CPU figures, not targets. The budgets sum to under 9 minutes
on one H100 (measured figures will replace these estimates after the first GPU run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from elastic_megatron.config.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Sizes:
    """What the run trains and measures; one set for the GPU, one for the CPU rehearsal."""

    model: str
    elastic: str
    precision: str  # trainer.precision and the tools' --dtype
    dtype: str
    seq: int  # the chain's sequence length
    pretrain_steps: int
    elastic_steps: int
    qad_steps: int
    calibration_batches: int
    new_tokens: int
    figure_seq: int  # train-4k, scan-kernels, elastic-step
    figure_steps: int
    decode_batches: str
    max_model_len: int
    max_bytes: int  # of the embedded corpus to tokenize


GPU = Sizes(model="small", elastic="small", precision="bf16", dtype="bf16", seq=1024, pretrain_steps=40,
            elastic_steps=20, qad_steps=10, calibration_batches=4, new_tokens=64, figure_seq=4096, figure_steps=10,
            decode_batches="1,32", max_model_len=2048, max_bytes=20_000_000)
REHEARSAL = Sizes(model="tiny", elastic="tiny", precision="fp32", dtype="fp32", seq=128, pretrain_steps=6,
                  elastic_steps=4, qad_steps=2, calibration_batches=2, new_tokens=12, figure_seq=256, figure_steps=2,
                  decode_batches="1,4", max_model_len=256, max_bytes=400_000)


@dataclass
class Stage:
    name: str
    budget_s: float  # the stage's share of the 9 minutes on one H100
    argv: Optional[list[str]] = None  # a subprocess; or `call` in this process
    call: Optional[Callable[["Run"], dict]] = None
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: skipped if one did not pass
    figures: Optional[Callable[["Run"], dict]] = None  # read after a passed subprocess
    env: dict = field(default_factory=dict)
    writes: Optional[str] = None  # its run dir under runs/, removed first: a rerun starts fresh


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    budget_s: float
    command: str = ""
    log: str = ""
    detail: str = ""
    figures: dict = field(default_factory=dict)


class Run:
    def __init__(self, out: Path, rehearse: bool, only: Optional[list[str]] = None):
        self.out, self.rehearse, self.only = out, rehearse, only
        self.sizes = REHEARSAL if rehearse else GPU
        self.runs = out / "runs"
        self.logs = out / "logs"
        self.figures_dir = out / "figures"
        self.data = out / "data" / "stdlib"
        self.results: list[Result] = []
        # A rerun of some stages into an earlier report keeps the other stages' results.
        earlier = out / "report.json"
        self.earlier = ([Result(**r) for r in json.loads(earlier.read_text())["stages"]]
                        if earlier.exists() and only else [])

    # ---- paths and commands -------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    @property
    def prefix(self) -> str:
        return f"{self.data}_text_document"

    def train(self, recipe: str, name: str, *overrides: str) -> list[str]:
        s = self.sizes
        return [sys.executable, "-m", "elastic_megatron.train", f"--config-name={recipe}", f"model={s.model}",
                f"data.prefixes=[{self.prefix}]", f"data.seq_length={s.seq}", f"trainer.precision={s.precision}",
                "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_interval=2",
                "trainer.eval_interval=1000", "trainer.eval_iters=2", "logger=none", f"run.dir={self.run_dir(name)}",
                *overrides]

    def tool(self, name: str, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "tools" / name), *args]

    def bench(self, name: str, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "benchmarks" / name), *args]

    def stages(self) -> list[Stage]:
        s = self.sizes
        elastic = (f"elastic={s.elastic}",)
        return [
            Stage("environment", 20, call=environment),
            Stage("pytest-gpu", 100, argv=[sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                          str(REPO / "tests")]),
            Stage("data", 20, argv=self.tool("preprocess_data.py", "--input", "python-stdlib", "--output-prefix",
                                             str(self.data), "--tokenizer", "byte", "--max-bytes", str(s.max_bytes),
                                             "--overwrite")),
            Stage("pretrain", 40, writes="pretrain", needs=("data",), argv=self.train(
                "pretrain", "pretrain", f"trainer.max_steps={s.pretrain_steps}", f"trainer.save_interval={s.pretrain_steps}")),
            Stage("importance", 25, writes="importance", needs=("pretrain",), argv=self.train(
                "importance_tiny", "importance", *elastic, f"elastic.parent_checkpoint={self.run_dir('pretrain')}",
                f"elastic.importance.calibration_batches={s.calibration_batches}", "elastic.importance.plots=false")),
            Stage("stage1", 35, writes="stage1", needs=("importance",), argv=self.train(
                "stage1_tiny", "stage1", *elastic, f"elastic.teacher_checkpoint={self.run_dir('importance')}",
                f"trainer.max_steps={s.elastic_steps}", f"trainer.save_interval={s.elastic_steps // 2}")),
            Stage("resume", 25, needs=("stage1",), call=resume_stage1),
            Stage("stage2", 35, writes="stage2", needs=("stage1",), argv=self.train(
                "stage2_tiny", "stage2", *elastic, f"elastic.teacher_checkpoint={self.run_dir('importance')}",
                f"elastic.init_checkpoint={self.run_dir('stage1')}", f"trainer.max_steps={s.elastic_steps}",
                f"trainer.save_interval={s.elastic_steps}")),
            Stage("qad", 35, writes="qad", needs=("stage2",), argv=self.train(
                "qad_tiny", "qad", *elastic, f"elastic.teacher_checkpoint={self.run_dir('stage2')}",
                f"trainer.max_steps={s.qad_steps}", f"trainer.save_interval={s.qad_steps}",
                f"quant.calibration_batches={s.calibration_batches}")),
            Stage("slice-bf16", 20, writes="slice-bf16", needs=("stage2",), argv=self.tool(
                "zero_shot_slicing.py", "--source-checkpoint", str(self.run_dir("stage2")), "--target-checkpoint",
                str(self.run_dir("slice-bf16")), "--size", "small", "--precision", "bf16", "--format", "both",
                "--overwrite")),
            Stage("slice-nvfp4", 20, writes="slice-nvfp4", needs=("qad",), argv=self.tool(
                "zero_shot_slicing.py", "--source-checkpoint", str(self.run_dir("qad")), "--target-checkpoint",
                str(self.run_dir("slice-nvfp4")), "--size", "small", "--precision", "nvfp4", "--format", "both",
                "--overwrite")),
            Stage("generate", 20, needs=("stage2",), argv=self.tool(
                "generate.py", "--checkpoint", str(self.run_dir("stage2")), "--think-budget", "small",
                "--answer-budget", "full", "--prompt", "class Parser", "--delimiter", ":", "--max-think-tokens",
                str(s.new_tokens // 2), "--max-new-tokens", str(s.new_tokens),
                "--report", str(self.figures_dir / "generate.json")),
                figures=lambda run: _generate_figures(run.figures_dir / "generate.json")),
            Stage("serve", 40, needs=("stage2",), call=serve_every_budget),
            Stage("train-4k", 60, needs=("data",), writes="train-4k", call=train_at_figure_length),
            Stage("scan-kernels", 45, argv=self.bench(
                "model_throughput.py", "--model", s.model, "--seq-length", str(s.figure_seq), "--micro-batch", "1",
                "--steps", str(s.figure_steps), "--warmup", "1", "--json", str(self.figures_dir / "scan-kernels.json")),
                figures=lambda run: json.loads((run.figures_dir / "scan-kernels.json").read_text())),
            # The tiny model's default spec routes its smallest budget (tiny_router); `small`'s own spec.
            Stage("elastic-step", 45, argv=self.bench(
                "elastic_overhead.py", "--model", s.model, *(("--elastic", s.elastic) if s.model != "tiny" else ()),
                "--seq", str(s.figure_seq), "--batch", "1", "--steps", str(s.figure_steps),
                "--json", str(self.figures_dir / "elastic-step.json")),
                figures=lambda run: json.loads((run.figures_dir / "elastic-step.json").read_text())),
            Stage("decode", 50, argv=self.bench(
                "generation.py", "--model", s.model, "--elastic", s.elastic, "--batches", s.decode_batches,
                "--prompt", "64", "--new", str(s.new_tokens), "--repeat", "2", "--no-hf", "--no-contiguous",
                "--no-control", "--json", str(self.figures_dir / "decode.json")),
                figures=lambda run: _decode_figures(run.figures_dir / "decode.json")),
        ]

    # ---- running ----------------------------------------------------------------------------

    def execute(self) -> list[Result]:
        stages = self.stages()
        known = [st.name for st in stages]
        for name in self.only or []:
            if name not in known:
                raise ConfigError("--stages", name, f"one of {', '.join(known)}")
        for d in (self.runs, self.logs, self.figures_dir, self.data.parent):
            d.mkdir(parents=True, exist_ok=True)
        passed: set[str] = set()
        for stage in stages:
            if self.only and stage.name not in self.only:
                continue
            missing = [n for n in stage.needs if n not in passed and (not self.only or n in self.only)]
            if missing:
                self.record(Result(stage.name, "skipped", 0.0, stage.budget_s, detail=f"needs {', '.join(missing)}"))
                continue
            result = self.run_stage(stage)
            if result.status == "passed":
                passed.add(stage.name)
            self.record(result)
        return self.results

    def run_stage(self, stage: Stage) -> Result:
        log = self.logs / f"{stage.name}.log"
        if stage.writes:
            shutil.rmtree(self.run_dir(stage.writes), ignore_errors=True)
        limit = self.limit(stage.budget_s)
        print(f"[gpu-check] {stage.name} (budget {stage.budget_s:.0f} s) ...", flush=True)
        begin = time.monotonic()
        if stage.call is not None:
            try:
                figures = stage.call(self) or {}
                # A stage run here has a log only if it ran a subprocess of its own.
                return Result(stage.name, "passed", time.monotonic() - begin, stage.budget_s,
                              log=_rel(log, self.out) if log.exists() else "", figures=figures)
            except Exception as err:  # a failed stage is recorded; the next one runs
                log.write_text(f"{type(err).__name__}: {err}\n")
                return Result(stage.name, "failed", time.monotonic() - begin, stage.budget_s, log=_rel(log, self.out),
                              detail=f"{type(err).__name__}: {err}"[:500])
        status, detail = _run(stage.argv, log, limit, {**stage.env})
        result = Result(stage.name, status, time.monotonic() - begin, stage.budget_s, command=shlex.join(stage.argv),
                        log=_rel(log, self.out), detail=detail)
        if status == "passed" and stage.figures is not None:
            try:
                result.figures = stage.figures(self)
            except Exception as err:
                result.status, result.detail = "failed", f"figures: {type(err).__name__}: {err}"[:500]
        return result

    def limit(self, budget_s: float) -> float:
        """A stage's time limit: 1.5x its budget on the GPU; on CPU (the rehearsal) a generous
        multiple, since it only has to catch a hang there, not a slow stage."""
        return budget_s * (10 if self.rehearse else 1.5)

    def record(self, result: Result) -> None:
        self.results.append(result)
        mark = {"passed": "ok", "skipped": "--"}.get(result.status, "!!")
        print(f"[gpu-check] {mark} {result.name}: {result.status} in {result.seconds:.1f} s"
              + (f" ({result.detail.splitlines()[0]})" if result.detail else ""), flush=True)
        write_report(self)


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _run(argv: list[str], log: Path, limit: float, extra_env: dict) -> tuple[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **extra_env}
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return "timeout", f"stopped after {limit:.0f} s"
    if code == 0:
        return "passed", ""
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    return "failed", f"exit {code}: " + " | ".join(tail)


# ---- stages run in this process -----------------------------------------------------------


def environment(run: Run) -> dict:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU rehearsal)"}
    for pkg in ("triton", "mamba-ssm", "causal-conv1d", "megatron-core", "nvidia-modelopt", "transformer-engine"):
        info[pkg] = version(pkg)
    from elastic_megatron.models.mamba_mixer import HAVE_MAMBA_SSM_KERNELS

    info["mamba_ssm_kernels_importable"] = HAVE_MAMBA_SSM_KERNELS
    if run.rehearse:
        return info
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible: run on a GPU machine, or use --rehearse on a CPU")
    if not HAVE_MAMBA_SSM_KERNELS:
        raise RuntimeError("mamba_ssm's Triton kernels do not import (not installed, or its package imports the "
                           "compiled selective_scan_cuda: see docs/gpu.md): the GPU would run "
                           "the PyTorch scan")
    return info


def resume_stage1(run: Run) -> dict:
    """Stage 1 continued from its last checkpoint for a few more steps (bf16 resume through
    Megatron's distributed optimizer state): it must start at the saved step, not at 0."""
    s = run.sizes
    more = s.elastic_steps + max(2, s.elastic_steps // 2)
    argv = run.train("stage1_tiny", "stage1", f"elastic={s.elastic}",
                     f"elastic.teacher_checkpoint={run.run_dir('importance')}", f"trainer.max_steps={more}",
                     f"trainer.save_interval={more}")
    log = run.logs / "resume.log"
    status, detail = _run(argv, log, run.limit(25), {})
    if status != "passed":
        raise RuntimeError(f"resume {status}: {detail}")
    if f"resumed from step {s.elastic_steps} " not in log.read_text(errors="replace"):
        raise RuntimeError(f"stage 1 did not resume from its step-{s.elastic_steps} checkpoint (see {log.name})")
    steps = [json.loads(line)["step"] for line in (run.run_dir("stage1") / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    if not steps or max(steps) != more:
        raise RuntimeError(f"resume logged steps {steps}, expected them to reach {more}")
    return {"resumed_from_step": s.elastic_steps, "ran_to_step": max(steps)}


def serve_every_budget(run: Run) -> dict:
    """tools/serve.py on the stage-2 checkpoint: one completion per budget and one with budget
    control, through HTTP; the answers' token counts and latencies."""
    import requests

    from elastic_megatron.jobs.tasks import Served, running_server

    argv = [sys.executable, str(REPO / "tools" / "serve.py"), "--checkpoint", str(run.run_dir("stage2")),
            "--dtype", run.sizes.dtype, "--max-model-len", str(run.sizes.max_model_len)]
    served = Served("elastic", run.sizes.dtype, argv, "gpucheck", [], True)
    figures = {}
    with running_server(served, run.logs / "serve.log", max_batch=4, timeout=180) as url:
        models = [m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]]
        budgets = [m for m in models if ":" in m]
        if not budgets:
            raise RuntimeError(f"the server lists no budgets: {models}")
        for model in budgets:
            begin = time.monotonic()
            body = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "def __init__(self",
                                                                 "max_tokens": run.sizes.new_tokens, "temperature": 0},
                                 timeout=120).json()
            if "choices" not in body:
                raise RuntimeError(f"{model}: {body}")
            figures[model] = {"completion_tokens": body["usage"]["completion_tokens"],
                              "seconds": round(time.monotonic() - begin, 3)}
        names = {m.split(":", 1)[1]: m for m in budgets}
        if not {"small", "full"} <= names.keys():
            raise RuntimeError(f"budget control needs budgets small and full; the server lists {sorted(names)}")
        small, full = names["small"], names["full"]
        body = requests.post(f"{url}/v1/completions", json={
            "model": full, "prompt": "class Parser", "max_tokens": run.sizes.new_tokens, "temperature": 0,
            "think_budget": small.split(":", 1)[1], "answer_budget": full.split(":", 1)[1], "think_delimiter": ":",
            "max_think_tokens": run.sizes.new_tokens // 2}, timeout=120).json()
        if "usage" not in body or "phases" not in body["usage"]:
            raise RuntimeError(f"budget control: {body}")
        figures["budget_control_phases"] = body["usage"]["phases"]
    return figures


def train_at_figure_length(run: Run) -> dict:
    """A short `small` pretraining run at the figure sequence length through the real trainer
    (Megatron DDP, its distributed optimizer, bf16): tokens/s, MFU and peak memory from its
    metrics, next to parallel/memory.py's estimate for the same layout."""
    s = run.sizes
    steps = max(4, s.figure_steps)
    argv = run.train("pretrain", "train-4k", f"data.seq_length={s.figure_seq}", "trainer.micro_batch_size=1",
                     "trainer.global_batch_size=1", f"trainer.max_steps={steps}", f"trainer.save_interval={10 * steps}",
                     f"trainer.log_interval={steps // 2}")
    status, detail = _run(argv, run.logs / "train-4k.log", run.limit(60), {})
    if status != "passed":
        raise RuntimeError(f"training {status}: {detail}")
    rows = [json.loads(line) for line in (run.run_dir("train-4k") / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    last = [r for r in rows if "tokens_per_s" in r][-1]
    figures = {"seq_length": s.figure_seq, "tokens_per_s": last["tokens_per_s"], "mfu": last.get("mfu"),
               "peak_memory_gib": last.get("memory_gib")}
    figures["estimate_gib"] = _memory_estimate_gib(run, s)
    measured = figures["peak_memory_gib"]
    if measured and measured == measured:  # nan on CPU
        figures["measured_over_estimate"] = measured / figures["estimate_gib"]
    return figures


def _memory_estimate_gib(run: Run, s: Sizes) -> float:
    from elastic_megatron.config.compose import compose_recipe
    from elastic_megatron.parallel.memory import estimate_memory

    job = compose_recipe("pretrain", [f"model={s.model}", f"data.seq_length={s.figure_seq}", "trainer.micro_batch_size=1",
                                      "trainer.global_batch_size=1", f"trainer.precision={s.precision}"])
    est = estimate_memory(job.model, job.parallel, 1, s.figure_seq, 1, 1, elastic=False, recompute=job.trainer.recompute,
                          activation_bytes=2 if s.precision == "bf16" else 4)
    return est.total / 2**30


def _generate_figures(path: Path) -> dict:
    report = json.loads(path.read_text())
    keep = ("phases", "tokens_per_s", "decode_tokens_per_s", "prefill_s", "seconds")
    return {k: v for k, v in report.items() if k in keep} or {"keys": sorted(report)}


def _decode_figures(path: Path) -> dict:
    report = json.loads(path.read_text())
    rows = report.get("rows", report.get("decode", []))
    out = {}
    for row in rows if isinstance(rows, list) else []:
        if "budget" in row and "batch" in row:
            out[f"{row['budget']} batch {row['batch']} decode tok/s"] = row["decode_tok_s"]
    return out or {"keys": sorted(report)}


# ---- the report ---------------------------------------------------------------------------


def write_report(run: Run) -> None:
    rerun = {r.name for r in run.results}
    order = [st.name for st in run.stages()]
    merged = [r for r in run.earlier if r.name not in rerun] + run.results
    merged.sort(key=lambda r: order.index(r.name) if r.name in order else len(order))
    results = [asdict(r) for r in merged]
    summary = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "timeout", "skipped")}
    env = next((r["figures"] for r in results if r["name"] == "environment"), {})
    report = {"mode": "rehearsal (CPU, tiny sizes)" if run.rehearse else "gpu", "sizes": asdict(run.sizes),
              "environment": env, "summary": summary, "seconds": round(sum(r["seconds"] for r in results), 1),
              "stages": results}
    (run.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# GPU acceptance run: {report['mode']}", "",
             f"{env.get('gpu', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, Triton "
             f"{env.get('triton', '?')}, mamba-ssm {env.get('mamba-ssm', '?')}, megatron-core {env.get('megatron-core', '?')}",
             "", f"{summary['passed']} passed, {summary['failed'] + summary['timeout']} failed, {summary['skipped']} skipped "
             f"in {report['seconds']:.0f} s", "", "| stage | status | seconds | budget s | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = (r["detail"].splitlines() or [""])[0].replace("|", "/")[:120]
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['budget_s']:.0f} | {detail} |")
    figures = [(r["name"], r["figures"]) for r in results if r["figures"] and r["name"] != "environment"]
    if figures:
        lines += ["", "## Figures", ""]
        for name, values in figures:
            lines.append(f"- **{name}**: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in values.items()))
    (run.out / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def check(run_out: Path, rehearse: bool, only: Optional[list[str]]) -> Run:
    if run_out.exists() and any(run_out.iterdir()) and not (run_out / "report.json").exists():
        raise ConfigError("--out", str(run_out), "a directory that is empty, new, or an earlier gpu-check report")
    return Run(run_out, rehearse, only)
