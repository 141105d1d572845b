"""Zero-shot slicing of elastic checkpoints: mask = slice on real files, HF export of a
slice read by transformers, bounded memory, refusals that write nothing, the storage
report against the files, and further training of a slice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, preset, token_batch
from checkpoint_helpers import elastic_meta
from elastic_helpers import logits, masked_logits, randomised_model
from elastic_megatron.checkpoint.manifest import CheckpointCorrupt
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert.megatron_dist import config_yaml
from elastic_megatron.elastic.widths import Widths, full_widths, sub_model_config
from elastic_megatron.models.counter import model_size
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.slicing.storage import measured_storage
from elastic_megatron.slicing.zero_shot import slice_checkpoint
from elastic_megatron.checkpoint import metadata, store

SMALL = Widths(hidden=48, attn_heads=2, mamba_heads=4, mamba_head_dim=8, ffn=64, moe_ffn=32, moe_experts=4, shared_ffn=32)
MEDIUM = Widths(hidden=56, attn_heads=4, mamba_heads=6, mamba_head_dim=16, ffn=96, moe_ffn=48, moe_experts=6, shared_ffn=48)


@pytest.fixture(scope="module")
def elastic_ckpt(dist, tmp_path_factory):
    """A tiny elastic checkpoint (random non-trivial weights) with three recorded budgets."""
    cfg = preset("tiny")
    model = randomised_model(cfg, seed=11)
    run_dir = tmp_path_factory.mktemp("elastic") / "run"
    budgets = {"full": full_widths(cfg), "medium": MEDIUM, "small": SMALL}
    store.save_checkpoint(run_dir, model, None, None, 10, 0, elastic_meta(cfg, budgets))
    return run_dir, cfg, model, budgets


def load(checkpoint):
    cfg, meta = metadata.checkpoint_model_config(checkpoint)
    torch.manual_seed(9)
    model = build_model(cfg)
    store.load_model_weights(checkpoint, model)
    return model.eval(), cfg, meta


@pytest.mark.parametrize("size", ["medium", "small"])
def test_slice_equals_hard_masked_elastic_model(elastic_ckpt, tmp_path, size):
    run_dir, cfg, model, budgets = elastic_ckpt
    out = slice_checkpoint(run_dir, tmp_path / size, size, precision="fp32")
    sliced, sub_cfg, meta = load(out)
    w = budgets[size]
    assert sub_cfg == sub_model_config(cfg, w, name=f"{cfg.name}_{size}")
    # Real reduced shapes: the counter of the slice is the budget's recorded cost.
    n = sum(p.numel() for p in sliced.parameters())
    assert n == model_size(sub_cfg).total_params == meta["sliced_from"]["total_params"] < model_size(cfg).total_params
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=40)
    assert (logits(sliced, ids, pos) - masked_logits(model, cfg, w, ids, pos)).abs().max().item() <= 1e-5


def test_slice_both_formats_and_transformers_reads_the_hf_one(elastic_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference (pip install -e .[test])")
    run_dir, cfg, _, _ = elastic_ckpt
    out = slice_checkpoint(run_dir, tmp_path / "small", "small", precision="fp32", fmt="both")
    sliced, sub_cfg, _ = load(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    assert sum(p.numel() for p in ref.parameters()) == model_size(sub_cfg).total_params
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=33)
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits.float()
    ours = logits(sliced, ids, pos)
    assert (ours - theirs).abs().max().item() <= 2e-5 * max(1.0, theirs.abs().max().item())


def test_slicing_refusals_write_nothing(elastic_ckpt, tmp_path, dist):
    run_dir, cfg, model, _ = elastic_ckpt
    cases = [
        (dict(size="13B"), "allowed: \\['full', 'medium', 'small'\\]"),
        (dict(size="small", precision="fp8"), "training data"),  # PTQ needs the run's data
        (dict(size="small", precision="int3"), "allowed"),
        (dict(size="small", fmt="onnx"), "allowed"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            slice_checkpoint(run_dir, tmp_path / "out", **kwargs)
    # A checkpoint without sort and architecture metadata is not elastic.
    plain = tmp_path / "plain"
    store.save_checkpoint(plain, model, None, None, 0, 0, {"config": config_yaml(cfg)})
    with pytest.raises(ConfigError, match="not elastic"):
        slice_checkpoint(plain, tmp_path / "out", "small")
    # A non-empty target is refused unless overwrite, and survives the refusal.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        slice_checkpoint(run_dir, taken, "small")
    assert (taken / "notes.txt").read_text() == "mine"
    slice_checkpoint(run_dir, taken, "small", overwrite=True)
    assert not (taken / "notes.txt").exists() and store.latest_step(taken) == 0
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_source_shard_fails_without_a_half_written_target(elastic_ckpt, tmp_path):
    import shutil

    run_dir, *_ = elastic_ckpt
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    shard = max((broken / "checkpoints" / "iter_0000010").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointCorrupt, match=f"{shard.name}: size .* != .* in manifest"):
        slice_checkpoint(broken, tmp_path / "out", "small", fmt="both")
    shard.unlink()
    with pytest.raises(CheckpointCorrupt, match=f"{shard.name}: missing"):
        slice_checkpoint(broken, tmp_path / "out", "small")
    # A checkpoint without a manifest (written before manifests existed) is still checked
    # against its own index before any read.
    (broken / "checkpoints" / "iter_0000010" / "manifest.json").unlink()
    with pytest.raises(CheckpointCorrupt, match=f"{shard.name}: missing"):
        slice_checkpoint(broken, tmp_path / "out", "small")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _safetensors_headers(directory) -> dict:
    """tensor name -> its safetensors header entry (dtype, shape, data_offsets), read from
    the files' headers (an 8-byte little-endian length, then JSON), no tensor loaded."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        out.update(header)
    return out


def _nbytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def _check_measured_files(m: dict, workdir, precision: str, budgets: dict, cfg) -> None:
    """The reported bytes of `precision` are its files on disk, file by file and in total."""
    on_disk = {p.relative_to(workdir).as_posix(): p.stat().st_size for p in (workdir / precision).rglob("*") if p.is_file()}
    assert on_disk and m["files"] == on_disk
    assert m["elastic"] == sum(v for k, v in on_disk.items() if k.startswith(f"{precision}/elastic/"))
    for name, w in budgets.items():
        # The full budget's standalone checkpoint is the full export itself, not a second copy.
        written = sum(v for k, v in on_disk.items() if k.startswith(f"{precision}/budget-{name}/"))
        assert m["per_budget"][name] == (m["elastic"] if w == full_widths(cfg) else written) > 0
        assert (written == 0) == (w == full_widths(cfg))
    assert m["separate"] == sum(m["per_budget"].values()) > m["elastic"]


def _check_tensor_bytes(directory, cfg, precision: str, analytic: int) -> None:
    """The tensors of an HF directory (sizes from the safetensors headers) are the counter's
    bytes of `cfg` in `precision` plus the router's fp32 correction bias, a buffer the
    counter (parameters only) leaves out; each quantized linear's packed weight and scales
    are exactly the counter's `tensor_bytes`, and the export quantizes exactly the linears
    the counter counts as quantized (attention stays bf16, as ModelOpt's recipe has it)."""
    from elastic_megatron.convert.hf_nemotron_h import hf_linear_names
    from elastic_megatron.models.counter import parameter_inventory, tensor_bytes

    headers = _safetensors_headers(directory)
    bias = 4 * cfg.moe_num_experts * cfg.hybrid_pattern.count("E")
    assert sum(_nbytes(h) for h in headers.values()) == analytic + bias
    if precision == "bf16":
        assert {h["dtype"] for h in headers.values()} == {"BF16", "F32"}
        return
    packed = {"fp8": "F8_E4M3", "nvfp4": "U8"}[precision]
    parts = {"fp8": {"weight", "weight_scale", "input_scale"},
             "nvfp4": {"weight", "weight_scale", "weight_scale_2", "input_scale"}}[precision]
    found = {n[: -len(".weight")] for n, h in headers.items() if n.endswith(".weight") and h["dtype"] == packed}
    counted = {}
    for e in parameter_inventory(cfg):
        if e.quantizable:
            (hf_module,) = hf_linear_names(e.name[: -len(".weight")])
            counted[hf_module] = e
    assert found == set(counted) and len(found) > 10
    assert not any("self_attention" in e.name for e in counted.values())
    for module, e in counted.items():
        assert {n[len(module) + 1:] for n in headers if n.startswith(module + ".")} == parts
        assert sum(_nbytes(headers[f"{module}.{s}"]) for s in parts) == tensor_bytes(e, precision), module
    assert json.loads((directory / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == precision.upper()


def test_storage_report_measures_the_files(elastic_ckpt, stdlib_prefix, tmp_path, monkeypatch):
    from elastic_megatron.models.counter import PRECISIONS
    from elastic_megatron.quant import calibrate
    from elastic_megatron.slicing.storage import render_storage

    run_dir, cfg, model, budgets = elastic_ckpt
    # The fixture's budgets cannot be served quantized (hidden 56: FP8 GEMMs need multiples
    # of 16, NVFP4 ones of 32) and its run recorded no training data (no post-training
    # scales): bf16 is measured, fp8 and nvfp4 are not, and the report says why.
    plain = measured_storage(run_dir, workdir=tmp_path / "plain", calibration_batches=1)
    assert list(plain.measured) == ["bf16"] and set(plain.unmeasured) == {"fp8", "nvfp4"}
    assert "budget='medium'" in plain.unmeasured["fp8"] and "(set by hidden), not a multiple of 16" in plain.unmeasured["fp8"]
    assert "not a multiple of 32" in plain.unmeasured["nvfp4"]
    assert plain.kernels["medium"]["fp8"].startswith("no: ") and plain.kernels["full"]["fp8"].endswith("(parent)")
    assert "not measured" in render_storage(plain) and plain.unmeasured["fp8"] in render_storage(plain)
    _check_measured_files(plain.measured["bf16"], tmp_path / "plain", "bf16", budgets, cfg)
    _check_tensor_bytes(tmp_path / "plain" / "bf16" / "elastic", cfg, "bf16", plain.elastic_bytes["bf16"])
    small = sub_model_config(cfg, budgets["small"])
    _check_tensor_bytes(tmp_path / "plain" / "bf16" / "budget-small", small, "bf16", plain.per_budget_bytes["small"]["bf16"])
    assert plain.separate_bytes["bf16"] == sum(model_size(sub_model_config(cfg, w)).total_bytes["bf16"] for w in budgets.values())

    # The same weights as a run that recorded its training data, with budgets whose
    # quantized GEMM widths are multiples of 32 (NVFP4 blocks nest, the serving kernels
    # take them): every precision.
    full = full_widths(cfg)
    nested = {"full": full, "medium": full.replace(ffn=96, moe_experts=6),
              "small": full.replace(hidden=32, ffn=64, moe_ffn=32, shared_ffn=32, mamba_heads=4, moe_experts=4)}
    job = config_yaml(cfg, run={"seed": 5, "dir": str(tmp_path / "run")},
                      data={"prefixes": [stdlib_prefix], "weights": None, "split": "98,2,0", "seq_length": 32,
                            "cache_dir": str(tmp_path / "data_cache")})
    store.save_checkpoint(tmp_path / "run", model, None, None, 10, 0, elastic_meta(cfg, nested, config=job))
    calls = []
    ptq = calibrate.ptq_scales
    monkeypatch.setattr(calibrate, "ptq_scales", lambda *a, **kw: calls.append(a[1]) or ptq(*a, **kw))
    work = tmp_path / "measured"
    report = measured_storage(tmp_path / "run", workdir=work, calibration_batches=1)
    assert report.unmeasured == {} and list(report.measured) == list(PRECISIONS)
    # Their one misaligned GEMM dimension is the tiny parent's own: the Mamba in_proj rows
    # 2*heads*16 + 2*2*16 + heads (328 at 8 heads, 196 at 4), which every slice inherits.
    in_proj = {"full": 328, "medium": 328, "small": 196}
    assert report.kernels == {b: {f: f"no: mixer.in_proj rows (N)={n} (parent)" for f in ("fp8", "nvfp4")}
                              for b, n in in_proj.items()}
    assert sorted(calls) == ["fp8", "nvfp4"]  # one set of scales per format, shared by all its exports
    for p in PRECISIONS:
        m = report.measured[p]
        _check_measured_files(m, work, p, nested, cfg)
        _check_tensor_bytes(work / p / "elastic", cfg, p, report.elastic_bytes[p])
        for name, w in nested.items():
            if w != full:
                _check_tensor_bytes(work / p / f"budget-{name}", sub_model_config(cfg, w), p, report.per_budget_bytes[name][p])
        assert (m["scales"] is None) == (p == "bf16")
    for key in ("elastic", "separate"):
        assert report.measured["nvfp4"][key] < report.measured["fp8"][key] < report.measured["bf16"][key]
    assert json.loads(json.dumps(report.as_dict())) == report.as_dict()
    text = render_storage(report)
    assert "not measured" not in text
    assert all(f"{report.measured[p]['elastic']:,} B" in text for p in PRECISIONS)


def test_storage_report_cli_analytic_for_the_30b_preset():
    proc = subprocess.run([sys.executable, "tools/describe_model.py", "model=nemotron_nano_v3_30b",
                           "elastic=star_elastic_nano_v3", "storage=true", "format=json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["budgets"] == ["30B", "23B", "12B"]
    # The paper's comparison (GiB): one elastic BF16 checkpoint 58.9 vs three separate 126.1.
    assert r["elastic_bytes"]["bf16"] / 2**30 == pytest.approx(58.9, abs=0.2)
    assert r["separate_bytes"]["bf16"] / 2**30 == pytest.approx(126.1, abs=0.5)
    assert r["elastic_bytes"]["nvfp4"] < r["elastic_bytes"]["fp8"] < r["elastic_bytes"]["bf16"]
    # Every quantized GEMM dimension of the shipped budgets is one the serving kernels take
    # (FP8: multiples of 16, NVFP4: of 32; quant/recipes.KERNEL_ALIGNMENT).
    assert r["recipe"] == "aggressive" and r["kernels"] == {b: {"fp8": "ok", "nvfp4": "ok"} for b in ("30B", "23B", "12B")}


@pytest.mark.slow
def test_slicing_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Slice (both formats) a ~400 MB checkpoint in a fresh process: its peak resident
    memory grows by at most a few times the largest tensor plus a constant, far less than
    the checkpoint, so a 30B checkpoint never has to fit in memory."""
    probe = [sys.executable, str(REPO / "tests" / "slicing_memory_probe.py")]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    made = subprocess.run(probe + ["make", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    done = subprocess.run(probe + ["slice", str(tmp_path / "run"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    limit = 4 * r["largest_tensor"] + 32 * 2**20
    assert r["checkpoint_bytes"] > 4 * limit  # the measurement can tell streaming from loading
    assert r["growth"] <= limit, r
    assert (tmp_path / "out" / "hf" / "config.json").exists() and store.latest_step(tmp_path / "out") == 0


def test_trainer_fine_tunes_a_slice(elastic_ckpt, stdlib_prefix, tmp_path):
    """A slice trains further: its recipe composes through hydra.searchpath and
    run.init_checkpoint starts from its weights (step 0, fresh optimizer)."""
    from elastic_megatron.train import run

    run_dir, *_ = elastic_ckpt
    out = slice_checkpoint(run_dir, tmp_path / "small", "small", precision="fp32", name="tiny_small")
    overrides = [f"hydra.searchpath=[file://{out / 'recipes'}]", "model=tiny_small", f"run.init_checkpoint={out}",
                 f"run.dir={tmp_path / 'ft'}", f"data.prefixes=[{stdlib_prefix}]", "data.seq_length=32",
                 "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=2",
                 "trainer.warmup_steps=0", "trainer.eval_interval=100", "trainer.save_interval=2", "logger=none"]
    result = run("pretrain", overrides)
    assert result.completed and result.start_step == 0
    tuned, cfg, _ = load(tmp_path / "ft")
    sliced, sub_cfg, _ = load(out)
    assert cfg == sub_cfg
    pairs = list(zip(tuned.parameters(), sliced.parameters()))
    assert any(not torch.equal(a, b) for a, b in pairs)  # it trained ...
    assert max((a - b).abs().max().item() for a, b in pairs) < 5e-3  # ... two Adam steps away from the slice
    # ... and a mismatching init checkpoint is refused before anything is built.
    with pytest.raises(ConfigError, match="run.init_checkpoint"):
        run("pretrain", [o for o in overrides if not o.startswith(("model=", "run.dir="))] + ["model=tiny", f"run.dir={tmp_path / 'bad'}"])


def _flip_byte(path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.slow
def test_every_tool_refuses_a_checkpoint_with_flipped_bytes(elastic_ckpt, tmp_path):
    """Same-length corruption inside a tensor file: slicing, export, evaluation and import
    stop with one error line naming the file, before writing anything."""
    from elastic_megatron.convert.hf_checkpoint import export_hf

    run_dir = elastic_ckpt[0]
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    shard = max(store.iteration_dir(bad, 10).glob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip_byte(shard)
    hf_bad = export_hf(run_dir, tmp_path / "hf", "fp32")
    hf_shard = next(hf_bad.glob("*.safetensors"))
    _flip_byte(hf_shard)
    tools = {
        "zero_shot_slicing.py": ["--source-checkpoint", str(bad), "--target-checkpoint", str(tmp_path / "o1"), "--size", "small"],
        "export_hf.py": ["--source-checkpoint", str(bad), "--target-checkpoint", str(tmp_path / "o2")],
        "evaluate_elastic.py": ["--elastic", str(bad), "--sorted", str(run_dir), "--unsorted", str(run_dir), "--out", str(tmp_path / "o3")],
        "import_hf.py": ["--hf-dir", str(hf_bad), "--target-checkpoint", str(tmp_path / "o4")],
        "describe_model.py": ["storage=true", f"checkpoint={bad}"],
    }
    for tool, args in tools.items():
        proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        named = hf_shard.name if tool == "import_hf.py" else shard.name
        assert proc.returncode == 2, (tool, proc.stderr[-2000:])
        assert "corrupt checkpoint: " in proc.stderr and named in proc.stderr and "hash mismatch" in proc.stderr, (tool, proc.stderr)
        assert "Traceback" not in proc.stderr, tool
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
