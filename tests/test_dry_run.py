"""The dry run (jobs/dry_run.py, tools/dry_run.py, `slurm/<stage>.sh --dry-run`).

- Tiny layouts (TP+SP with EP, TP with PP, TP with CP, EP alone) on 4 ranks: every rank the
  dry run builds on the meta device over the fake process group holds exactly what the
  same rank holds in a real 4-process gloo run with instantiated weights: its parallel
  ranks, parameters and every checkpoint shard (key, global shape, offset, local shape,
  replica id, dtype) of model and optimizer.
- Inputs: a dry run with real data and a real sorted teacher passes; too little data and
  an unsorted teacher are one line each.
- The shipped 30B stage1, stage2 and QAD recipes through their launchers' --dry-run, on
  the layouts of their #SBATCH headers (slow).
- Refusals: layouts that do not tile, before anything is built; tiling failures name the
  rank, the module and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_parallel import torchrun

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.models.counter import model_size
from elastic_megatron.parallel.memory import estimate_memory
from elastic_megatron.parallel.simulate import Shard, check_tiling
from elastic_megatron.train import compose_job

# The small budget narrows every axis (heads too), so every mask hook's shard is checked.
COMMON = ["elastic.teacher_checkpoint=unused", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
          "++elastic.budgets.2.widths={hidden:32,moe_ffn:32,attn_heads:2,mamba_heads:4,mamba_head_dim:8,ffn:64,shared_ffn:32}"]
LAYOUTS = {
    "tp2_ep2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2", "parallel.etp=1"],
    "tp2_pp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2"],  # expert TP = tp = 2
    "tp2_cp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.cp=2"],
    "ep4": ["parallel.ep=4", "parallel.etp=1"],
}
WORKER = REPO / "tests" / "dry_run_worker.py"


def simulate(tmp: Path, jobs: dict) -> subprocess.Popen:
    """Start the dry runs of `jobs` in one process (tests/dry_run_worker.py); `reports` reads them."""
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    with open(tmp / "simulate.log", "w") as log:  # a file, not a pipe nobody reads while torchrun runs
        return subprocess.Popen([sys.executable, str(WORKER), "simulate", str(tmp), str(spec)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)


def reports(proc: subprocess.Popen, tmp: Path, jobs: dict) -> dict:
    proc.wait(timeout=900)
    assert proc.returncode == 0, (tmp / "simulate.log").read_text()[-4000:]
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in jobs}


def shard_set(entries: list[dict]) -> set:
    return {tuple(tuple(v) if isinstance(v, list) else v for v in Shard.from_dict(e).as_dict().values()) for e in entries}


def estimate_failures(report: dict, job, world: int, params: dict[int, int]) -> list[int]:
    """The ranks whose parameters (`params`, counted independently) differ from the memory
    estimate's: the dry run must report exactly these (the estimate reports one stage, so
    the dry run holds pp = 1 layouts to it)."""
    if job.parallel.pp > 1:
        return []
    est = estimate_memory(job.model, job.parallel, world, job.data.seq_length, job.trainer.micro_batch_size,
                          job.trainer.global_batch_size, activation_bytes=4 if job.trainer.precision == "fp32" else 2)
    return sorted(r for r, n in params.items() if n != round(est.weights / 2))


def assert_only_estimate_failures(report: dict, ranks: list[int]) -> None:
    lines = report["failures"]
    assert len(lines) == len(ranks), lines
    for r, line in zip(ranks, lines):
        assert line.startswith(f"rank {r} (") and "the memory estimate counts" in line, line


@pytest.fixture(scope="module")
def tiny(sorted_parent, tmp_path_factory):
    """The tiny dry runs (one process: every layout on 4 ranks, the default selection of
    one, and two with real inputs) side by side with the instantiated runs of the layouts
    (torchrun, 4 gloo processes): ({job: report}, {layout: {rank: record}})."""
    tmp = tmp_path_factory.mktemp("dry_run_tiny")
    layouts = {name: COMMON + overrides for name, overrides in LAYOUTS.items()}
    jobs = {name: {"recipe": "stage1_tiny", "overrides": o, "nodes": 1, "gpus_per_node": 4, "ranks": "all"}
            for name, o in layouts.items()}
    jobs["tp2_ep2_classes"] = {**jobs["tp2_ep2"], "ranks": "classes"}
    jobs["ep4_bf16"] = {**jobs["ep4"], "overrides": jobs["ep4"]["overrides"] + ["trainer.precision=bf16"]}
    jobs["tp2_ep2_router"] = {**jobs["tp2_ep2"], "overrides": COMMON[:3] + LAYOUTS["tp2_ep2"] + ["elastic=tiny_router"]}
    root, prefix = sorted_parent
    data = [f"data.prefixes=[{prefix}]", "data.seq_length=64", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4", "trainer.max_steps=10"]
    inputs = {"recipe": "stage1_tiny", "nodes": 1, "gpus_per_node": 1, "check_inputs": True}
    jobs["inputs_ok"] = {**inputs, "overrides": data + [f"elastic.teacher_checkpoint={root / 'sorted'}"]}
    jobs["inputs_bad"] = {**inputs, "overrides": data + [f"elastic.teacher_checkpoint={root / 'parent'}",
                                                        "trainer.max_steps=100000"]}
    simulated = simulate(tmp, jobs)
    spec = tmp / "layouts.json"
    spec.write_text(json.dumps(layouts))
    proc = torchrun(4, str(WORKER), "instantiate", str(tmp), str(spec), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    real = {name: {r: json.loads((tmp / f"{name}.{r}.json").read_text()) for r in range(4)} for name in layouts}
    return reports(simulated, tmp, jobs), real


@pytest.fixture(scope="module")
def tiny_layouts(tiny):
    """{layout: (dry-run report, {rank: record of the instantiated run})}."""
    dry, real = tiny
    return {name: (report, real.get(name.removesuffix("_classes"))) for name, report in dry.items()
            if name.removesuffix("_classes") in real}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_holds_what_the_instantiated_run_holds(tiny_layouts, layout):
    report, real = tiny_layouts[layout]
    assert report["world"] == 4 and len(report["ranks"]) == 4
    for r in report["ranks"]:
        rank = r["coords"]["rank"]
        got = {k: r["coords"][k] for k in ("pp", "tp", "cp", "ep", "etp", "dp")}
        assert got == real[rank]["coords"], rank
        assert (r["params"], r["expert_params"]) == (real[rank]["params"], real[rank]["expert_params"]), rank
        assert r["cpu_params"] < r["params"] / 10  # the meta build leaves only small tensors on the CPU
        assert shard_set(report["shards"][str(rank)]) == shard_set(real[rank]["shards"]), rank
    job = compose_job("stage1_tiny", COMMON + LAYOUTS[layout])
    assert_only_estimate_failures(report, estimate_failures(report, job, 4, {r: real[r]["params"] for r in real}))
    # The main replicas hold every parameter once; every budget's closed form is the counter's.
    assert report["layout_params"] == model_size(job.model).total_params
    assert report["budgets"] and all(b["counter"] == b["closed_form"] for b in report["budgets"])


def test_one_rank_per_class_covers_the_layout(tiny_layouts):
    """The default selection builds 2 of the 4 ranks of tp2_ep2 (ranks 2 and 3 are their
    data-parallel replicas), and those hold every shard once as the main replica."""
    report, real = tiny_layouts["tp2_ep2_classes"]
    assert sorted(r["coords"]["rank"] for r in report["ranks"]) == [0, 1]
    assert sorted(sum((r["stands_for"] for r in report["ranks"]), [])) == [0, 1, 2, 3]
    assert not [f for f in report["failures"] if "memory estimate" not in f]
    for r in report["ranks"]:
        assert shard_set(report["shards"][str(r["coords"]["rank"])]) == shard_set(real[r["coords"]["rank"]]["shards"])


def test_memory_per_rank_follows_the_gpu_trainer(tiny_layouts, tiny):
    """bf16 on EP 4 (DP 4 for dense weights, every expert once): weights and teacher 2 B,
    gradients 4 B, the distributed optimizer's 12 B sharded over each weight's
    data-parallel ranks; at TP 1 the estimate counts the same parameters, so every term
    agrees with it and nothing fails."""
    report = tiny[0]["ep4_bf16"]
    _, real = tiny_layouts["ep4"]
    assert report["failures"] == []
    for r in report["ranks"]:
        rec, m = real[r["coords"]["rank"]], r["memory"]
        dense, expert = rec["params"] - rec["expert_params"], rec["expert_params"]
        assert (m["weights"], m["teacher"], m["gradients"]) == (2 * rec["params"], 2 * rec["params"], 4 * rec["params"])
        assert m["optimizer"] == pytest.approx(12 * (dense / 4 + expert / 1))


def test_routed_budgets_masks_fit_every_shard(tiny):
    """Router-chosen budgets (every axis routed): the router's mixture masks, split for
    each rank, fit every masked module; their counts are known only after training."""
    report = tiny[0]["tp2_ep2_router"]
    assert [f for f in report["failures"] if "memory estimate" not in f] == []
    assert sum("router-chosen widths" in n for n in report["notes"]) == 2
    assert [b["name"] for b in report["budgets"]] == ["full"]


def _tiling_input(report: dict) -> dict[int, list[Shard]]:
    return {int(r): [Shard.from_dict(e) for e in entries] for r, entries in report["shards"].items()}


def test_tiling_failures_name_rank_module_and_key(tiny_layouts):
    report, _ = tiny_layouts["tp2_ep2"]
    shards = _tiling_input(report)
    assert check_tiling(shards) == []
    key = "embedding.word_embeddings.weight"  # split over TP: rank 1 (and its replica, rank 3) hold rows 192..383
    gap = {r: [s for s in e if not (r in (1, 3) and s.key == key)] for r, e in shards.items()}
    lines = check_tiling(gap)
    assert len(lines) == 1 and f"key {key} (model.{key})" in lines[0] and "offset (192, 0)" in lines[0], lines
    # Rank 3 is rank 1's data-parallel replica; claiming replica 0 writes the block twice.
    twice = {r: [dataclasses.replace(s, replica_id=(0, 0, 0)) if (r == 3 and s.key == key) else s for s in e]
             for r, e in shards.items()}
    lines = check_tiling(twice)
    assert any("rank 1 (model.embedding" in line and "rank 3 (model.embedding" in line and key in line for line in lines), lines
    bad = {r: [dataclasses.replace(s, global_shape=(383, 64)) if (r == 2 and s.key == key) else s for s in e]
           for r, e in shards.items()}
    lines = check_tiling(bad)
    assert lines and lines[0].startswith(f"rank 2: model.{key}: key {key} has global shape (383, 64)"), lines


def _cut(pattern: str, *lengths: int) -> str:
    stages, start = [], 0
    for n in lengths:
        stages.append(pattern[start:start + n])
        start += n
    return "|".join(stages + [pattern[start:]])


@pytest.mark.parametrize("overrides, key", [
    (["parallel.ep=3"], "model.moe_num_experts"),  # 128 experts over 3 EP ranks
    (["parallel.pp=3"], "parallel.pp"),  # 52 layers in 3 even stages
    (["parallel.pp=4", "parallel.pp_layout"], "parallel.pp_layout"),  # middle stages of 13 and 14 layers
    (["parallel.cp=3"], "parallel.cp"),  # 32 Mamba heads per TP rank over 3 CP ranks
])
def test_layouts_that_do_not_tile_are_refused_before_anything_is_built(overrides, key):
    from elastic_megatron.jobs.dry_run import dry_run

    job = compose_job("stage1", ["elastic.teacher_checkpoint=x"])
    if "parallel.pp_layout" in overrides:
        overrides = ["parallel.pp=4", f"parallel.pp_layout='{_cut(job.model.hybrid_pattern, 12, 13, 14)}'"]
    with pytest.raises(ConfigError) as err:
        dry_run(compose_job("stage1", ["elastic.teacher_checkpoint=x", *overrides]), 8, 8)
    assert err.value.key == key, err.value


def test_inputs(tiny, sorted_parent, tmp_path, dist):
    """Real data and a real sorted teacher pass every check; too little data for
    max_steps and an unsorted teacher (the parent before importance) are one line each."""
    from elastic_megatron.data.datasets import DataSpec, build_datasets, load_tokenizer_for

    dry, _ = tiny
    root, prefix = sorted_parent
    assert dry["inputs_ok"]["failures"] == []
    # The training split's samples, counted by Megatron's own dataset (one pass).
    spec = DataSpec([prefix], None, "98,2,0", 64, 1234, str(tmp_path / "cache"))
    train, _ = build_datasets(spec, load_tokenizer_for([prefix]), train_samples=1, valid_samples=1)
    assert any(f"holds {len(train):,} samples of 64 tokens" in n for n in dry["inputs_ok"]["notes"]), dry["inputs_ok"]["notes"]
    failures = dry["inputs_bad"]["failures"]
    assert len(failures) == 2, failures
    assert failures[0].startswith(f"data: data.prefixes[0] {prefix}: its training split holds {len(train):,} samples")
    assert "400,000" in failures[0] and "repeat" in failures[0]
    assert failures[1].startswith(f"elastic.teacher_checkpoint: {root / 'parent'} is not a sorted parent")


def run_launcher(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(REPO / "slurm" / script), "--dry-run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_launcher_refuses_bad_input_with_one_line():
    proc = run_launcher("stage2.sh", "elastic.teacher_checkpoint=x", "parallel.ep=3")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: invalid config model.moe_num_experts=128: must be divisible by parallel.ep=3"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("dry run of stage2 on 8 nodes x 8 GPUs (the #SBATCH header of")


def expected_rank_params(cfg, parallel) -> int:
    """One rank's parameters under a pp = 1 layout, from the counter's inventory: dense
    tensors split over TP except norms and routers (every TP rank holds those whole),
    routed experts over EP x expert-TP."""
    from elastic_megatron.config.parallel import expert_tensor_parallel
    from elastic_megatron.models.counter import parameter_inventory

    inv = parameter_inventory(cfg)
    whole = sum(e.numel for e in inv if e.component in ("norm", "router"))
    expert = sum(e.numel for e in inv if e.component == "expert")
    split = sum(e.numel for e in inv) - whole - expert
    return split // parallel.tp + whole + expert // (parallel.ep * expert_tensor_parallel(parallel))


def check_30b_report(report: dict, recipe: str) -> list[int]:
    """A 30B report against independent expectations; the ranks whose estimate lines it must carry."""
    from elastic_megatron.elastic.budgets import resolve_budgets
    from elastic_megatron.elastic.widths import full_widths, sub_model_config

    job = compose_job(recipe, ["elastic.teacher_checkpoint=planned"])
    assert job.model.name == "nemotron_nano_v3_30b" and (report["nodes"], report["gpus_per_node"]) == (8, 8)
    # One rank per class; together they stand for all 64.
    assert sorted(sum((r["stands_for"] for r in report["ranks"]), [])) == list(range(64))
    per_rank = expected_rank_params(job.model, job.parallel)
    assert {r["params"] for r in report["ranks"]} == {per_rank}
    failing = estimate_failures(report, job, 64, {r["coords"]["rank"]: r["params"] for r in report["ranks"]})
    assert_only_estimate_failures(report, failing)
    for r in report["ranks"]:  # fits an 80 GB GPU with the estimate's 10% margin
        assert r["memory"]["total"] < 0.9 * 80 * 2**30
    assert report["layout_params"] == model_size(job.model).total_params
    counts = {b["name"]: b for b in report["budgets"]}
    for b in resolve_budgets(job.elastic, job.model, job.parallel):
        cfg = job.model if b.fixed == full_widths(job.model) else sub_model_config(job.model, b.fixed)
        assert counts[b.name]["closed_form"] == counts[b.name]["counter"] == model_size(cfg).total_params
    return failing


@pytest.mark.slow
def test_shipped_30b_stage1_through_its_launcher(tmp_path):
    """`bash slurm/stage1.sh --dry-run`: the layout of its own #SBATCH header (8 x 8 GPUs)."""
    out = tmp_path / "report.json"
    proc = run_launcher("stage1.sh", "--skip-inputs", "elastic.teacher_checkpoint=planned", f"--json={out}")
    failing = check_30b_report(json.loads(out.read_text()), "stage1")
    assert proc.returncode == (2 if failing else 0), proc.stderr[-3000:]
    assert proc.stdout.startswith("dry run of stage1 on 8 nodes x 8 GPUs (the #SBATCH header of")


@pytest.fixture(scope="module")
def stage2_and_qad(tmp_path_factory):
    """Stage 2 and QAD share a layout (nano_h100_cp2) and a model: one process runs both
    (on the 8 x 8 GPUs of slurm/stage2.sh's and slurm/qad.sh's headers)."""
    jobs = {r: {"recipe": r, "overrides": ["elastic.teacher_checkpoint=planned"], "nodes": 8, "gpus_per_node": 8}
            for r in ("stage2", "qad")}
    tmp = tmp_path_factory.mktemp("dry_run_30b")
    return reports(simulate(tmp, jobs), tmp, jobs)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["stage2", "qad"])
def test_shipped_30b_stage2_and_qad(stage2_and_qad, recipe):
    check_30b_report(stage2_and_qad[recipe], recipe)
