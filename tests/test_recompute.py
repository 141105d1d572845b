"""Activation recomputation (trainer.recompute): the elastic step with a routed budget gives
the same loss and gradients (model and router), bit for bit (fp32, CPU), with and without
recompute, and keeps fewer activations for backward."""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.checkpoint import store
from elastic_megatron.convert.megatron_dist import config_yaml
from elastic_megatron.elastic.step import ElasticDistillStep
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.recompute import SavedActivations, apply_recompute
from elastic_megatron.parallel.pipeline import forward_backward
from elastic_megatron.train import compose_job

from elastic_helpers import randomised_model

SEQ = 96

MODES = {
    "full_uniform_1": dict(granularity="full", method="uniform", num_layers=1),
    "full_uniform_4": dict(granularity="full", method="uniform", num_layers=4),
    "full_block_3": dict(granularity="full", method="block", num_layers=3),
    "selective_all": dict(granularity="selective", modules=("core_attn", "mamba_scan", "moe", "mlp")),
    "selective_default": dict(granularity="selective"),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, dist):
    cfg = compose_job("stage1_tiny").model
    path = tmp_path_factory.mktemp("recompute") / "teacher"
    store.save_checkpoint(path, randomised_model(cfg, seed=3), None, None, 0, 0,
                          {"config": config_yaml(cfg), "sort_index": {"note": "test parent, identity order"}})
    return path


def elastic_step(teacher, tmp_path, mode: dict | None, budgets: tuple[str, str] = ("[0,0,1]", "1")):
    """(loss, model gradients, router gradient, saved activation bytes) of one elastic
    micro-step on the routed `small` budget of tiny_router (or `budgets`: the curriculum's
    probabilities and budgets per micro-batch)."""
    job = compose_job("stage1_tiny", ["elastic=tiny_router", f"elastic.teacher_checkpoint={teacher}",
                                      f"elastic.curriculum.budget_probs={budgets[0]}",
                                      f"elastic.curriculum.budgets_per_batch={budgets[1]}", f"run.dir={tmp_path}"])
    step_fn = ElasticDistillStep(job)
    torch.manual_seed(0)
    model = build_model(job.model)
    if mode is not None:
        apply_recompute(model, **mode)
    step_fn.setup(model, torch.float32)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, job.model.vocab_size, (2, SEQ + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ),
             "position_ids": torch.arange(SEQ).expand(2, SEQ)}
    with SavedActivations(model, step_fn.teacher) as saved:
        losses, _ = forward_backward(step_fn, model, [batch], step=1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    router = torch.cat([p.grad.reshape(-1) for p in step_fn.router.parameters() if p.grad is not None])
    return losses[0].item(), grads, router, saved.bytes


def assert_bit_for_bit(got, ref) -> None:
    """Loss, every model gradient and the router's gradient identical to the last bit."""
    (loss, grads, router), (loss0, grads0, router0) = got, ref
    assert loss == loss0
    assert sorted(grads) == sorted(grads0)
    different = [n for n, g in grads.items() if not torch.equal(g, grads0[n])]
    assert not different, different
    assert torch.equal(router, router0)


@pytest.fixture(scope="module")
def baseline(teacher, tmp_path_factory):
    return elastic_step(teacher, tmp_path_factory.mktemp("none"), None)


@pytest.mark.parametrize("name", list(MODES))
def test_recompute_gives_the_same_loss_and_gradients_and_saves_less(name, teacher, baseline, tmp_path):
    loss0, grads0, router0, saved0 = baseline
    loss, grads, router, saved = elastic_step(teacher, tmp_path, MODES[name])
    assert router0.abs().max() > 1e-4  # the budget is routed: the router's gradient goes through the masks
    assert_bit_for_bit((loss, grads, router), (loss0, grads0, router0))
    assert saved < saved0, (saved, saved0)
    if MODES[name]["granularity"] == "full" and MODES[name].get("method") == "uniform":
        # Whole layers keep only their inputs: most of the activations are gone.
        assert saved < 0.5 * saved0, (saved, saved0)


def test_each_budget_of_a_micro_batch_is_recomputed_with_its_own_masks(teacher, tmp_path):
    """Two routed budgets share one teacher pass: each student pass's checkpoints must
    restore that pass's masks (the second budget's, or none, would give other gradients)."""
    two = ("[0,0.5,0.5]", "2")
    loss0, grads0, router0, _ = elastic_step(teacher, tmp_path / "none", None, two)
    loss, grads, router, _ = elastic_step(teacher, tmp_path / "full", MODES["full_uniform_1"], two)
    assert_bit_for_bit((loss, grads, router), (loss0, grads0, router0))


def test_recompute_settings_are_refused_by_name():
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.config.schema import validate_job

    for overrides, key, says in (
            (["trainer.recompute=everything"], "trainer.recompute", "allowed"),
            (["trainer.recompute=full", "trainer.recompute_method=random"], "trainer.recompute_method", "allowed"),
            (["trainer.recompute=full", "trainer.recompute_num_layers=0"], "trainer.recompute_num_layers", "positive integer"),
            (["trainer.recompute=selective", "trainer.recompute_modules=[core_attn,attention]"], "trainer.recompute_modules",
             "unknown ['attention']; allowed")):
        with pytest.raises(ConfigError) as err:
            validate_job(compose_job("stage1_tiny", overrides))
        assert err.value.key == key and says in str(err.value)
