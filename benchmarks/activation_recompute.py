"""Step time and activation memory of activation recomputation (trainer.recompute) in the
elastic distillation step, every mode in one run on one device (CUDA when available).

    python benchmarks/activation_recompute.py               # tiny, seq 1024, batch 2, 5 steps
    python benchmarks/activation_recompute.py --model small --seq 4096 --json runs/recompute.json

Modes: none; selective with the default modules (mamba_scan + moe), each module alone,
all four; full (uniform, 1 layer). Each mode builds a fresh student (same seed, recompute
applied before `ElasticDistillStep.setup`) and trains the last budget (routed for
elastic=tiny_router, pinned for elastic=small). Timed: zero_grad + forward_backward, no
optimizer step; after warm-up the modes' steps are interleaved, each round in a rotated order
(--no-interleave: one mode after another, one model resident). Positional KEY=VALUE
arguments are Hydra overrides of the job (recipe stage1_tiny, dotted keys), after the
benchmark's own.

Figures: the median step time and its ratio to none; saved, the bytes autograd keeps for
backward (`SavedActivations`, device-independent: the primary memory figure) and its ratio;
peak, on CUDA max_memory_allocated over one step minus what was allocated before it, on CPU
the RSS high-water mark minus RSS before it (noisy). PASS/MISS: the issue's expectation,
step time <= 1.4x none for full, <= 1.1x for selective (printed, never asserted).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Megatron's modules are imported where they are used: --help and a bad option answer at once.
from elastic_megatron.cli import benchmark_parser, run_benchmark  # noqa: E402
from elastic_megatron.config.compose import compose_recipe  # noqa: E402
from elastic_megatron.config.errors import ConfigError, require_positive_int  # noqa: E402

ALL_MODULES = ("core_attn", "mamba_scan", "moe", "mlp")
# name -> apply_recompute arguments
MODES = {
    "none": dict(granularity="none"),
    "selective (default)": dict(granularity="selective", modules=("mamba_scan", "moe")),
    **{f"selective {m}": dict(granularity="selective", modules=(m,)) for m in ALL_MODULES},
    "selective all four": dict(granularity="selective", modules=ALL_MODULES),
    "full uniform 1": dict(granularity="full", method="uniform", num_layers=1),
}
LIMITS = {"none": None, "selective": 1.1, "full": 1.4}  # step time vs none, from the issue
DEFAULT_ELASTIC = {"tiny": "tiny_router", "small": "small"}
MiB = 2**20


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    """Collect garbage and give freed memory back (CUDA cache; glibc heap on CPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _CpuPeak:
    """RSS high-water mark over a block, minus RSS before it. Linux: the kernel's VmHWM,
    reset through /proc/self/clear_refs; elsewhere psutil sampled every millisecond."""

    def __init__(self):
        self.proc = psutil.Process()
        self.delta = 0

    @staticmethod
    def _reset_hwm():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return lambda: next(int(line.split()[1]) * 1024 for line in
                                Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        except OSError:
            return None

    def __enter__(self):
        _free()  # so that the step's growth shows
        self.base = self.proc.memory_info().rss
        self.read = self._reset_hwm()
        if self.read is None:
            self.peak, self.stop = self.base, threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.read is not None:
            self.peak = self.read()
        else:
            self.stop.set()
            self.thread.join()
        self.delta = max(0, self.peak - self.base)


class Run:
    """One recompute mode: its own student (same seed) and step function; the frozen
    teacher can be shared (`teacher`: that of another run)."""

    def __init__(self, name: str, mode: dict, job, dtype, micro_cpu: dict, teacher=None):
        from elastic_megatron.elastic.step import ElasticDistillStep
        from elastic_megatron.models.hybrid import build_model
        from elastic_megatron.models.recompute import apply_recompute

        self.name, self.mode = name, mode
        self.kind = mode["granularity"]
        self.step_fn = ElasticDistillStep(job)
        torch.manual_seed(0)
        self.model = build_model(job.model, dtype, parallel=job.parallel)
        apply_recompute(self.model, **mode)
        self.step_fn.setup(self.model, dtype)
        if teacher is not None:  # the same weights: keep one copy
            self.step_fn.teacher = teacher
        device = next(self.model.parameters()).device
        self.micro = {k: v.to(device) for k, v in micro_cpu.items()}
        self.times: list[float] = []
        self.saved = self.peak = 0
        self.loss = float("nan")

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)
        self.step_fn.router_optimizer.zero_grad(set_to_none=True)

    def step(self, i: int) -> float:
        """One timed step (step index i + 1); returns the loss."""
        from elastic_megatron.parallel.pipeline import forward_backward

        _sync()
        start = time.perf_counter()
        self.zero_grad()
        losses, _ = forward_backward(self.step_fn, self.model, [self.micro], step=i + 1)
        _sync()
        self.last_time = time.perf_counter() - start
        return losses[0].item()

    def measure(self, i: int, gpu: bool) -> None:
        """Saved activation bytes (and the loss) at step i, the peak memory at step i + 1."""
        from elastic_megatron.models.recompute import SavedActivations
        from elastic_megatron.parallel.pipeline import forward_backward

        self.zero_grad()
        with SavedActivations(self.model, self.step_fn.teacher) as saved:
            losses, _ = forward_backward(self.step_fn, self.model, [self.micro], step=i + 1)
        self.saved, self.loss = saved.bytes, losses[0].item()
        self.zero_grad()
        if gpu:
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward(self.step_fn, self.model, [self.micro], step=i + 2)
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base
        else:
            with _CpuPeak() as cpu:
                forward_backward(self.step_fn, self.model, [self.micro], step=i + 2)
            self.peak = cpu.delta

    def release(self) -> None:
        """Drop the models, keep the figures."""
        self.model = self.step_fn = self.micro = None
        _free()

    @property
    def median(self) -> float:
        return sorted(self.times)[len(self.times) // 2]


def bench(runs: list[Run], steps: int, warmup: int, gpu: bool) -> None:
    """Warm-up rounds, the memory measurement, one untimed round (what the measurement
    gave back is faulted in again), then the timed rounds, each in a rotated order."""
    i = 0  # every run takes the same steps (same Gumbel draws, same temperature)
    for _ in range(warmup):
        for r in runs:
            r.step(i)
        i += 1
    for r in runs:
        r.measure(i, gpu)
    i += 2
    for r in runs:
        r.step(i)
    i += 1
    for s in range(steps):
        k = s % len(runs)
        for r in runs[k:] + runs[:k]:
            r.step(i)
            r.times.append(r.last_time)
        i += 1


def parse(argv=None):
    parser = benchmark_parser(__doc__, overrides="Hydra overrides of the job (recipe stage1_tiny, dotted keys)")
    parser.add_argument("--model", default="tiny", help="model preset (recipes/model/), default tiny")
    parser.add_argument("--elastic", default=None, help=f"elastic spec (recipes/elastic/); default by model: {DEFAULT_ELASTIC}")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 20 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--no-interleave", dest="interleave", action="store_false",
                        help="run one mode after another, one model resident (default: steps interleaved)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure and step time here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run_benchmark(args, lambda: measure(args))


def measure(args) -> None:
    from elastic_megatron.checkpoint import store
    from elastic_megatron.convert.megatron_dist import config_yaml
    from elastic_megatron.models.hybrid import build_model, resolve_token_dispatcher
    from elastic_megatron.parallel.setup import distributed
    from elastic_megatron.training.run import params_dtype

    wall = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.is_available()
    model, extra, json_path, interleave = args.model, args.overrides, args.json, args.interleave
    elastic = args.elastic or DEFAULT_ELASTIC.get(model)
    if elastic is None:
        raise ConfigError("--elastic", None, f"--model {model} needs an elastic spec of that model (recipes/elastic/*.yaml); "
                                             f"defaults exist for {sorted(DEFAULT_ELASTIC)}")
    steps = (20 if gpu else 5) if args.steps is None else args.steps
    warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    seq, batch = args.seq, args.batch
    for key, value in (("--steps", steps), ("--seq", seq), ("--batch", batch)):
        require_positive_int(key, value)
    if warmup < 0:
        raise ConfigError("--warmup", warmup, "must be an integer >= 0")
    base = compose_recipe("stage1_tiny", [f"model={model}", f"elastic={elastic}", "elastic.teacher_checkpoint=unused", *extra])
    dtype = params_dtype("auto")
    with tempfile.TemporaryDirectory() as tmp, distributed():
        teacher = Path(tmp) / "teacher"
        torch.manual_seed(0)
        store.save_checkpoint(teacher, build_model(base.model, dtype), None, None, 0, 0,
                              {"config": config_yaml(base.model), "sort_index": {"note": "benchmark"}})
        n = len(base.elastic.budgets)
        job = compose_recipe("stage1_tiny", [
            f"model={model}", f"elastic={elastic}", f"elastic.teacher_checkpoint={teacher}",
            f"elastic.curriculum.budget_probs=[{'0,' * (n - 1)}1]", "elastic.curriculum.budgets_per_batch=1",
            f"data.seq_length={seq}", "trainer.precision=auto", f"run.dir={Path(tmp) / 'run'}", *extra])
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, job.model.vocab_size, (batch, seq + 1), generator=gen)
        micro = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq),
                 "position_ids": torch.arange(seq).expand(batch, seq)}

        device = f"GPU {torch.cuda.get_device_name()}" if gpu else f"CPU, {torch.get_num_threads()} threads"
        runs: list[Run] = []
        for name, mode in MODES.items():
            runs.append(Run(name, mode, job, dtype, micro, teacher=runs[0].step_fn.teacher if interleave and runs else None))
            if len(runs) == 1:
                last = runs[0].step_fn.budgets[-1]
                print(f"model {model} ({device}, {dtype}), dispatcher {resolve_token_dispatcher(job.model)}, "
                      f"elastic {elastic}: budget {last.name} ({'routed' if last.routed else 'pinned'}), "
                      f"batch {batch} x {seq} tokens; median of {steps} steps after {warmup} warm-up, "
                      f"{len(MODES)} modes {'interleaved' if interleave else 'one after another'}; "
                      "timed: zero_grad + forward_backward")
            if not interleave:
                bench(runs[-1:], steps, warmup, gpu)
                runs[-1].release()
        if interleave:
            bench(runs, steps, warmup, gpu)
            for r in runs:
                r.release()

    ref = runs[0]
    peak_label = "peak MiB" if gpu else "RSS+ MiB"
    header = (f"{'mode':<22}{'ms/step':>10}{'x none':>8}{'saved MiB':>11}{'x none':>8}{peak_label:>10}"
              f"{'x none':>8}  expect   result")
    print(header)
    print("-" * len(header))
    rows = []
    for r in runs:
        t_ratio, s_ratio = r.median / ref.median, r.saved / ref.saved
        p_ratio = r.peak / ref.peak if ref.peak else float("nan")
        limit = LIMITS[r.kind]
        verdict = "-" if limit is None else ("PASS" if t_ratio <= limit else "MISS")
        expect = "-" if limit is None else f"<={limit}x"
        print(f"{r.name:<22}{r.median * 1e3:>10.1f}{t_ratio:>8.2f}{r.saved / MiB:>11.1f}{s_ratio:>8.2f}"
              f"{r.peak / MiB:>10.1f}{p_ratio:>8.2f}  {expect:<7}  {verdict}")
        rows.append({"mode": r.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in r.mode.items()},
                     "step_times_s": r.times, "median_s": r.median, "min_s": min(r.times), "time_ratio": t_ratio,
                     "saved_bytes": r.saved, "saved_ratio": s_ratio, "peak_bytes": r.peak, "peak_ratio": p_ratio,
                     "time_limit": limit, "result": verdict, "loss": r.loss})
    diff = max(abs(r.loss - ref.loss) for r in runs)
    print(f"loss of the measured step, largest difference to none: {diff:.3g} ({ref.loss:.6f} with none)")
    if not gpu:
        print(f"load average at start {load:.2f} on {os.cpu_count()} cores (other processes make CPU timings noisy)")
        print("RSS+ is the RSS high-water mark over one step minus RSS before it (noisy on CPU); "
              "saved is the primary memory figure")
    wall = time.perf_counter() - wall
    print(f"wall time {wall:.1f} s")
    if json_path:
        out = {"model": model, "elastic": elastic, "budget": last.name, "routed": last.routed, "device": device,
               "dtype": str(dtype), "seq": seq, "batch": batch, "steps": steps, "warmup": warmup, "interleave": interleave,
               "timed": "zero_grad + forward_backward", "peak_kind": "cuda_max_allocated" if gpu else "rss_high_water_delta",
               "overrides": extra, "load_average_at_start": load, "rows": rows, "wall_s": wall}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {json_path}")


if __name__ == "__main__":
    sys.exit(main())
