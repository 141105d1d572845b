"""Layout-independent fresh initialisation (models/init.py) in one process: the weights
have Megatron's distributions, follow the seed, and leave the run's RNG where one draw
leaves it. tests/test_parallel.py holds the weights of TP/PP/EP runs to the single
process's."""

from __future__ import annotations

import dataclasses
import math

import torch

from elastic_megatron.models.hybrid import build_model

from conftest import preset


def _build(init: str, seed: int):
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(preset("tiny"), init=init))
    return dict(model.named_parameters()), torch.rand(1)


def test_layout_independent_weights_have_megatrons_distributions(dist):
    ours, _ = _build("layout_independent", 0)
    megatron, _ = _build("megatron", 0)
    assert ours.keys() == megatron.keys()
    std = preset("tiny").init_method_std
    for name, p in ours.items():
        ref = megatron[name]
        assert p.shape == ref.shape and p.dtype == ref.dtype, name
        if torch.equal(ref, torch.ones_like(ref)):  # norms, D
            assert torch.equal(p, ref), name
            continue
        assert not torch.equal(p, ref), name  # drawn anew
        if name.endswith("A_log"):  # log U(1, 16)
            assert p.min() >= 0 and p.max() <= math.log(16), name
        elif name.endswith("dt_bias"):  # softplus^-1 of dt in [1e-3, 0.1]
            dt = torch.nn.functional.softplus(p)
            assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5), name
        elif "conv1d" in name:  # U(+-1/sqrt(d_conv))
            assert p.abs().max() <= 0.5 and p.abs().max() > 0.4, name
        else:  # normal(0, std), scaled for the output projections, as Megatron draws them
            assert p.numel() >= 500, name
            assert abs(p.std().item() / ref.std().item() - 1) < 0.15, name
            assert abs(p.mean().item()) < 4 * ref.std().item() / math.sqrt(p.numel()) + 1e-6, name
            assert p.std().item() < 1.2 * std, name


def test_layout_independent_weights_follow_the_seed_and_leave_the_rng_one_draw_on(dist):
    first, after_first = _build("layout_independent", 3)
    again, after_again = _build("layout_independent", 3)
    other, _ = _build("layout_independent", 4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first if "norm" not in n and not n.endswith(".D"))
    torch.manual_seed(3)
    torch.randint(0, 2**62, ())  # the one draw that seeds the weights
    assert torch.equal(after_first, torch.rand(1)) and torch.equal(after_first, after_again)
