"""Helpers shared by the elastic tests: models with non-trivial norms and expert biases
(fresh initialisation sets them to 1 and 0, which would hide indexing mistakes)."""

from __future__ import annotations

import torch

from elastic_megatron.elastic.reindex import prefix_index, reindex_state_dict
from elastic_megatron.elastic.widths import Widths, sub_model_config
from elastic_megatron.models.hybrid import build_model


def randomised_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith(("dt_bias", "D"))):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    model.eval()
    return model


def logits(model, ids, pos) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pos, None).float()


def masked_logits(model, cfg, w: Widths, ids, pos) -> torch.Tensor:
    """Logits of `model` with hard masks for widths `w` (the hooks removed afterwards)."""
    from elastic_megatron.elastic.masks import ElasticHooks, hard_masks

    hooks = ElasticHooks(model, cfg)
    try:
        hooks.set(hard_masks(cfg, w))
        return logits(model, ids, pos)
    finally:
        hooks.remove()


def sliced_model(parent, cfg, w: Widths):
    """The nested model with real smaller shapes, weights cut from `parent`."""
    sub_cfg = sub_model_config(cfg, w)
    torch.manual_seed(123)
    sub = build_model(sub_cfg)
    sd = reindex_state_dict(cfg, prefix_index(cfg, w), parent.state_dict())
    sub.load_state_dict(sd, strict=True)
    sub.eval()
    return sub, sub_cfg


def train_overrides(prefix, run_dir, **extra) -> list[str]:
    """Hydra overrides for a short CPU training run of a recipe on `prefix`."""
    values = {
        "run.dir": str(run_dir), "data.prefixes": f"[{prefix}]", "data.seq_length": 64,
        "trainer.micro_batch_size": 2, "trainer.global_batch_size": 4, "trainer.warmup_steps": 2,
        "trainer.log_interval": 1, "trainer.eval_interval": 100, "trainer.eval_iters": 2, "trainer.save_interval": 100,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
