"""Print parameter counts and checkpoint sizes of a model preset, without building it.

    python tools/describe_model.py model=nemotron_nano_v3_30b
    python tools/describe_model.py model=small format=json

Storage report (one elastic checkpoint vs separate checkpoints of every size, per
precision): analytic from a preset and an elastic spec, or measured on the files of a
real elastic checkpoint next to the analytic figures (its full model and every budget
written in a temporary directory as bf16, fp8 and nvfp4 HF exports; the quantized ones
with one set of post-training scales per format, or the checkpoint's own):

    python tools/describe_model.py model=nemotron_nano_v3_30b elastic=star_elastic_nano_v3 storage=true
    python tools/describe_model.py storage=true checkpoint=runs/demo-stage2

The storage report also says which budgets' FP8 / NVFP4 exports the serving kernels take
(every quantized GEMM dimension a multiple of 16 / 32, quant/recipes.py; `quant=nvfp4
quant.recipe=conservative` for the other ModelOpt recipe).

Per-GPU memory of elastic distillation (student + teacher + optimizer + activations)
under a parallel layout, before submitting:

    python tools/describe_model.py model=nemotron_nano_v3_30b memory=true parallel=nano_h100 nodes=8
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import pop_debug_flag, report_errors  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
from elastic_megatron.config.loading import load_model_config  # noqa: E402
from elastic_megatron.models.counter import PRECISIONS, model_size  # noqa: E402

FORMATS = ("table", "json")
COMPONENTS = ("embedding", "mamba", "attention", "mlp", "router", "expert", "shared_expert", "norm", "output")


def _b(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def render_table(cfg, size) -> str:
    pattern = cfg.hybrid_pattern
    lines = [
        f"model {cfg.name}: {cfg.num_layers} layers "
        f"({pattern.count('M')} Mamba2, {pattern.count('*')} attention, {pattern.count('-')} MLP, {pattern.count('E')} MoE), "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
        f"pattern {pattern}",
        "",
        f"{'component':<16}{'total params':>16}{'active params':>16}",
    ]
    for comp in COMPONENTS:
        if comp in size.params_by_component:
            lines.append(f"{comp:<16}{size.params_by_component[comp]:>16,}{size.active_by_component.get(comp, 0):>16,}")
    lines.append(f"{'all':<16}{size.total_params:>16,}{size.active_params:>16,}   ({_b(size.total_params)} total, {_b(size.active_params)} active)")
    lines += ["", f"{'precision':<16}{'checkpoint':>16}{'active weights':>16}"]
    for p in PRECISIONS:
        lines.append(f"{p:<16}{_gb(size.total_bytes[p]):>16}{_gb(size.active_bytes[p]):>16}")
    return "\n".join(lines)


# Published storage figures of elastic checkpoints, printed under the analytic report of
# that preset for comparison (the Star Elastic paper, Nemotron Nano v3 30B with nested 23B
# and 12B models).
PAPER_STORAGE = {
    "nemotron_nano_v3_30b": "paper (Star Elastic, 30B/23B/12B): elastic BF16 58.9 GiB vs separate BF16 126.1 GiB; "
                            "elastic NVFP4 18.7 GB",
}


def storage_report(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    from elastic_megatron.config.elastic import ElasticConfig
    from elastic_megatron.elastic.budgets import spec_budgets
    from elastic_megatron.slicing.storage import analytic_storage, measured_storage, render_storage

    if cfg.checkpoint:
        report = measured_storage(cfg.checkpoint)
    else:
        model_cfg = load_model_config(cfg.model)
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ElasticConfig), cfg.elastic))
        if not spec.enabled:
            raise ConfigError("elastic", spec.name, "storage=true compares nested sizes: choose an elastic spec (e.g. elastic=star_elastic_nano_v3) or checkpoint=<elastic run>")
        fixed, routed = spec_budgets(model_cfg, spec)
        if not fixed:
            raise ConfigError("elastic", spec.name, f"every budget is router-chosen ({routed}): pass checkpoint=<elastic run> for resolved widths")
        quant = cfg.get("quant") or {}
        report = analytic_storage(model_cfg, fixed, quant.get("recipe") or "aggressive")
        report.skipped = routed
    if cfg.format == "json":
        return json.dumps(report.as_dict())
    text = render_storage(report)
    if not cfg.checkpoint and report.model in PAPER_STORAGE:
        text += "\n\n" + PAPER_STORAGE[report.model]
    return text


def memory_report(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    from elastic_megatron.config.errors import require_positive_int
    from elastic_megatron.config.parallel import (
        ParallelConfig, layout_data_parallel, require_batch_split, require_sequence_split, validate_parallel_layout,
    )
    from elastic_megatron.config.schema import TrainerConfig, validate_recompute
    from elastic_megatron.parallel.memory import estimate_memory, render_memory

    model_cfg = load_model_config(cfg.model)
    parallel = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ParallelConfig), cfg.parallel))
    for key in ("nodes", "gpus_per_node", "seq_length", "micro_batch_size", "global_batch_size", "budgets_per_batch"):
        require_positive_int(key, cfg[key])
    world = cfg.nodes * cfg.gpus_per_node
    validate_parallel_layout(model_cfg, parallel)
    dp = layout_data_parallel(parallel, world)
    require_batch_split(cfg.global_batch_size, cfg.micro_batch_size, dp, prefix="")
    require_sequence_split(cfg.seq_length, parallel, key="seq_length")
    trainer = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerConfig), {
        k: cfg[k] for k in ("recompute", "recompute_method", "recompute_num_layers", "recompute_modules")}))
    try:
        validate_recompute(trainer)
    except ConfigError as err:  # name the key as this tool takes it (recompute=, not trainer.recompute=)
        raise ConfigError(err.key.removeprefix("trainer."), err.value, err.allowed) from None
    est = estimate_memory(model_cfg, parallel, world, cfg.seq_length, cfg.micro_batch_size, cfg.global_batch_size,
                          cfg.budgets_per_batch, recompute=trainer.recompute, recompute_method=trainer.recompute_method,
                          recompute_num_layers=trainer.recompute_num_layers, recompute_modules=trainer.recompute_modules)
    recompute = trainer.recompute + (f" ({trainer.recompute_method}, {trainer.recompute_num_layers} layer(s))" if trainer.recompute == "full"
                                     else f" ({', '.join(trainer.recompute_modules)})" if trainer.recompute == "selective" else "")
    if cfg.format == "json":
        return json.dumps({"model": model_cfg.name, "world": world, "dp": dp, "cp": parallel.cp, "recompute": recompute, **est.as_dict()})
    return render_memory(model_cfg, parallel, world, cfg.gpus_per_node, est, cfg.seq_length, cfg.micro_batch_size,
                         cfg.global_batch_size, cfg.gpu_memory_gib, recompute)


def describe(cfg: DictConfig) -> str:
    if cfg.format not in FORMATS:
        raise ConfigError("format", cfg.format, f"allowed: {list(FORMATS)}")
    if cfg.memory:
        return memory_report(cfg)
    if cfg.storage:
        return storage_report(cfg)
    model_cfg = load_model_config(cfg.model)
    size = model_size(model_cfg)
    if cfg.format == "json":
        return json.dumps({"model": model_cfg.name, "hybrid_pattern": model_cfg.hybrid_pattern, **size.as_dict()})
    return render_table(model_cfg, size)


@hydra.main(config_path="../recipes", config_name="describe_model", version_base=None)
def main(cfg: DictConfig) -> None:
    code, text = report_errors(lambda: describe(cfg))
    if code:
        sys.exit(code)  # SystemExit passes through Hydra's handler, which would print a traceback
    print(text)


if __name__ == "__main__":
    pop_debug_flag()
    main()
