"""The Star Elastic method on CPU: sorting keeps the function (invariant 1), REAP equals
its formula, router gradients and cost targeting (6), self-distillation (7), chunked KD,
curriculum frequencies, and the importance -> stage 1 -> stage 2 chain with exact resume
(8, router and Gumbel RNG included)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import preset, small_config, token_batch
from elastic_helpers import logits, randomised_model, train_overrides as _common

from elastic_megatron.config.elastic import BudgetConfig, ElasticConfig
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.elastic.budgets import budgets_meta, resolve_budgets
from elastic_megatron.distill.losses import kd_loss, kl_from_logits
from elastic_megatron.elastic.importance import ImportanceCollector, sorting_index
from elastic_megatron.elastic.masks import ElasticHooks, hard_masks, mixture_masks
from elastic_megatron.elastic.reindex import reindex_state_dict
from elastic_megatron.elastic.router import BudgetRouter, gumbel_softmax
from elastic_megatron.elastic.step import BudgetSampler, ElasticDistillStep
from elastic_megatron.models.forward import stage_hidden
from elastic_megatron.elastic.widths import full_widths, model_cost, sub_model_config
from elastic_megatron.models.counter import model_size
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.checkpoint import metadata, store
from elastic_megatron.train import compose_job, dispatch, run
from elastic_megatron.training.loop import train


def _collect(model, cfg, batches):
    collector = ImportanceCollector(model, cfg)
    with torch.no_grad():
        for ids, pos in batches:
            model(ids, pos, None)
    collector.remove()
    return collector.scores()


@pytest.mark.parametrize("pattern", ["M*EM-E", "*-M"])
def test_sorting_keeps_the_function_and_orders_every_axis(dist, pattern):
    cfg = small_config(pattern)
    model = randomised_model(cfg, seed=5)
    batches = [token_batch(cfg.vocab_size, batch=2, seq=48, seed=s) for s in range(3)]
    before = [logits(model, *b) for b in batches]
    index = sorting_index(cfg, _collect(model, cfg, batches))
    assert not torch.equal(index.hidden, torch.arange(cfg.hidden_size))  # a real permutation
    model.load_state_dict(reindex_state_dict(cfg, index, model.state_dict()))
    for b, ref in zip(batches, before):
        assert (logits(model, *b) - ref).abs().max().item() <= 1e-5  # invariant 1
    # Scoring the sorted model again finds every axis in descending order: the
    # permutations reached every tensor that carries the axis.
    again = _collect(model, cfg, batches)

    def descending(t, groups=1):
        rows = t.reshape(groups, -1)
        return bool((rows[:, :-1] >= rows[:, 1:] - 1e-9).all())

    assert descending(again.hidden)
    for s in again.layers:
        if s.attn_heads is not None:
            assert descending(s.attn_heads, cfg.num_query_groups)
        if s.mamba_heads is not None:
            assert descending(s.mamba_heads, cfg.mamba_num_groups) and descending(s.mamba_head_dim)
        for t in (s.ffn, s.shared_ffn, s.moe_experts):
            if t is not None:
                assert descending(t)
        if s.moe_ffn is not None:
            assert descending(s.moe_ffn, s.moe_ffn.shape[0])


def test_reap_scores_equal_the_formula(dist):
    """One MoE layer with a known routing: expert 0's bias keeps it out of every top-k."""
    cfg = small_config("E", moe_num_experts=4, moe_router_topk=2, moe_shared_expert_ffn_hidden_size=0)
    model = randomised_model(cfg, seed=11)
    layer = model.decoder.layers[0]
    with torch.no_grad():
        layer.mlp.router.expert_bias.copy_(torch.tensor([-100.0, 0.0, 0.1, -0.1]))
    captured = {}
    handle = layer.mlp.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=32)
    scores = _collect(model, cfg, [(ids, pos)]).layers[0].moe_experts
    handle.remove()

    x = captured["x"].reshape(-1, cfg.hidden_size).double()
    router = layer.mlp.router
    gate_scores = torch.sigmoid(x @ router.weight.double().T)
    chosen = (gate_scores + router.expert_bias.double()).topk(cfg.moe_router_topk, dim=-1).indices
    expected = torch.zeros(cfg.moe_num_experts, dtype=torch.float64)
    for e in range(cfg.moe_num_experts):
        rows = (chosen == e).any(-1)
        if not rows.any():
            continue
        picked = gate_scores[rows].gather(-1, chosen[rows])
        gate = gate_scores[rows, e] / picked.sum(-1) * cfg.moe_router_topk_scaling_factor
        expert = layer.mlp.experts.local_experts[e]
        h = x[rows] @ expert.linear_fc1.weight.double().T
        out = torch.relu(h).pow(2) @ expert.linear_fc2.weight.double().T
        expected[e] = (gate * out.norm(dim=-1)).mean()
    assert expected[0] == 0 and scores[0] == 0  # never routed
    assert (expected[1:] > 0).all()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-7)


def _router_budgets(cfg):
    spec = ElasticConfig(enabled=True, budgets=[
        BudgetConfig(name="full"),
        BudgetConfig(name="mid", target=0.7 * model_cost(cfg, full_widths(cfg)),
                     candidates={"hidden": [32, 40, 48, 56, 64], "moe_ffn": [16, 32, 48, 64], "mamba_heads": [4, 6, 8]}),
    ])
    return resolve_budgets(spec, cfg)


def test_router_gradients_flow_through_gumbel_softmax(dist):
    cfg = preset("tiny")
    budgets = _router_budgets(cfg)
    router = BudgetRouter(budgets, cfg, hidden_size=16)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.3)
    model = randomised_model(cfg)
    hooks = ElasticHooks(model, cfg)
    gen = torch.Generator().manual_seed(0)
    inp, w = router.budget_input(1)
    lg = router.logits(inp, w)
    samples = {a: gumbel_softmax(lg[a], 0.5, gen, hard=True) for a in router.routed_axes(budgets[1])}
    for y in samples.values():
        assert sorted(y.detach().tolist()).count(1.0) == 1  # forward value is one candidate
    hooks.set(mixture_masks(cfg, {a: router.choices[a] for a in samples}, samples))
    ids, pos = token_batch(cfg.vocab_size)
    model(ids, pos, None).float().pow(2).mean().backward()
    hooks.remove()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0  # KD-side gradient reaches the router


def test_short_run_at_a_fixed_budget_reaches_the_target(dist):
    cfg = preset("tiny")
    budgets = _router_budgets(cfg)
    router = BudgetRouter(budgets, cfg, hidden_size=16)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    from elastic_megatron.distill.losses import router_loss

    start = None
    for _ in range(150):
        inp, w = router.budget_input(1)
        cost = router.expected_cost(budgets[1], router.logits(inp, w))
        start = cost.item() if start is None else start
        loss = router_loss(cost, budgets[1].target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = {a: v.detach() for a, v in router.logits(*router.budget_input(1)).items()}
    final = router.expected_cost(budgets[1], logits).item()
    target = budgets[1].target
    assert abs(start / target - 1) > 0.05  # it had to move
    assert abs(final / target - 1) < 0.01
    # The expected cost is the mean parameter count of the architectures the router
    # samples: every candidate combination's instantiated size (the counter's, held
    # equal to numel in test_counter.py), weighted by its probability.
    axes = router.routed_axes(budgets[1])
    probs = {a: torch.softmax(logits[a].double(), -1) for a in axes}
    mean = 0.0
    for pick in itertools.product(*(range(len(router.choices[a])) for a in axes)):
        arch = budgets[1].fixed.replace(**{a: router.choices[a][i] for a, i in zip(axes, pick)})
        weight = math.prod(probs[a][i].item() for a, i in zip(axes, pick))
        mean += weight * model_size(sub_model_config(cfg, arch)).total_params
    assert final == pytest.approx(mean, rel=1e-6)
    # What a checkpoint records is the argmax architecture: its recorded size is the sliced
    # model's numel. The router loss steers the expected cost, not the argmax, so the
    # recorded size is only near the target (5% above it here).
    resolved = router.resolve_budget(1)
    assert resolved == budgets[1].fixed.replace(**{a: router.choices[a][int(logits[a].argmax())] for a in axes})
    recorded = budgets_meta(ElasticConfig(enabled=True), cfg, budgets, {"full": full_widths(cfg), "mid": resolved})
    sliced = sum(p.numel() for p in build_model(sub_model_config(cfg, resolved)).parameters())
    assert recorded["budgets"][1]["total_params"] == sliced == model_cost(cfg, resolved)
    assert abs(sliced / target - 1) < 0.10, (sliced, target)


def test_at_a_one_hot_choice_the_expected_cost_is_the_chosen_models_numel(dist):
    """With every axis's distribution one-hot (a router output that saturates softmax),
    the router's expected cost, total and active, is the parameter count of the model
    sliced to that choice and built, and `resolve` returns that choice."""
    cfg = preset("tiny")
    budgets = _router_budgets(cfg)
    router = BudgetRouter(budgets, cfg, hidden_size=16)
    choice = {"hidden": 40, "moe_ffn": 32, "mamba_heads": 6}
    with torch.no_grad():
        bias, start = torch.zeros_like(router.net[2].bias), 0
        for a in router.axes:
            bias[start + router.choices[a].index(choice[a])] = 200.0  # softmax: exactly 1 and 0 in fp32
            start += len(router.choices[a])
        router.net[2].bias.copy_(bias)
    logits = router.logits(*router.budget_input(1))
    assert all(torch.equal(torch.softmax(logits[a], -1), F.one_hot(logits[a].argmax(), len(router.choices[a])).float())
               for a in router.axes)
    arch = budgets[1].fixed.replace(**choice)
    assert router.resolve_budget(1) == arch
    sliced = build_model(sub_model_config(cfg, arch))
    numel = sum(p.numel() for p in sliced.parameters())
    assert router.expected_cost(budgets[1], logits).item() == numel
    mid = dataclasses.replace(budgets[1], target_kind="active_params")
    per_expert = 2 * choice["hidden"] * choice["moe_ffn"]
    inactive = cfg.count("E") * (cfg.moe_num_experts - cfg.moe_router_topk) * per_expert
    assert router.expected_cost(mid, logits).item() == numel - inactive


def test_self_distillation_gives_zero_loss_and_zero_gradients(dist):
    cfg = preset("tiny")
    student = randomised_model(cfg)
    teacher = randomised_model(cfg, seed=99)
    teacher.load_state_dict(student.state_dict())
    student.train()
    ids, pos = token_batch(cfg.vocab_size, seq=40)
    with torch.no_grad():
        th = stage_hidden(teacher, ids, pos)
    kd, _ = kd_loss(stage_hidden(student, ids, pos), th, student.output_layer, teacher.output_layer,
                    torch.ones(ids.shape), temperature=2.0, chunk_tokens=16)
    kd.backward()
    assert abs(kd.item()) <= 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) <= 1e-6


def test_chunked_kd_equals_the_whole_vocabulary_formula():
    torch.manual_seed(0)
    hidden, vocab = 16, 50
    s_layer, t_layer = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    wrap = lambda lin: (lambda x: (lin(x), None))  # noqa: E731  Megatron linears return (out, bias)
    hs, ht = torch.randn(12, 2, hidden, requires_grad=True), torch.randn(12, 2, hidden)
    mask = (torch.rand(2, 12) > 0.3).float()
    kd, _ = kd_loss(hs, ht, wrap(s_layer), wrap(t_layer), mask, temperature=1.5, chunk_tokens=5)
    ls, lt = s_layer(hs.transpose(0, 1)) / 1.5, t_layer(ht.transpose(0, 1)) / 1.5
    per_token = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="none").sum(-1) * 1.5**2
    expected = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(kd, expected)
    # Top-k KD over all logits is the full KD; over fewer it differs.
    full = kl_from_logits(ls.reshape(-1, vocab), lt.reshape(-1, vocab), 1.0, top_k=vocab)
    torch.testing.assert_close(full, kl_from_logits(ls.reshape(-1, vocab), lt.reshape(-1, vocab), 1.0))
    assert not torch.allclose(full, kl_from_logits(ls.reshape(-1, vocab), lt.reshape(-1, vocab), 1.0, top_k=5))


def test_curriculum_sampling_frequencies_match_the_recipe():
    probs = compose_job("stage2_tiny").elastic.curriculum.budget_probs
    assert probs == [0.5, 0.3, 0.2]
    draws = BudgetSampler(probs, 3, 1, torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.tensor([draws.sample()[0] for _ in range(20000)]), minlength=3).double() / 20000
    assert (counts - torch.tensor(probs, dtype=torch.float64)).abs().max() < 0.015
    a, b = (BudgetSampler(probs, 3, 1, torch.Generator().manual_seed(3)) for _ in range(2))
    assert [a.sample() for _ in range(50)] == [b.sample() for _ in range(50)]  # same seed, same budgets (every rank)
    uniform = BudgetSampler(None, 3, 2, torch.Generator().manual_seed(4))
    pairs = [uniform.sample() for _ in range(3000)]
    assert all(len(set(p)) == 2 for p in pairs)  # several budgets per batch: distinct
    freq = torch.bincount(torch.tensor(pairs).reshape(-1), minlength=3).double() / 6000
    assert (freq - 1 / 3).abs().max() < 0.02


# ---- the whole chain on the embedded corpus -------------------------------------------


class SignalAt(ElasticDistillStep):
    def __init__(self, job, at: int):
        super().__init__(job)
        self.at = at

    def __call__(self, model, batch, step):
        if step == self.at and model.training:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().__call__(model, batch, step)


def test_elastic_resume_is_exact_router_and_gumbel_included(sorted_parent):
    root, prefix = sorted_parent

    def job(name):
        return compose_job("stage1_tiny", _common(prefix, root / name, **{
            "elastic": "tiny_router", "elastic.teacher_checkpoint": str(root / "sorted"),
            "trainer.max_steps": 6, "trainer.eval_interval": 6, "elastic.curriculum.budgets_per_batch": 2}))

    straight_step = ElasticDistillStep(job("straight"))
    straight = train(job("straight"), step_fn=straight_step)
    first = train(job("split"), step_fn=SignalAt(job("split"), 3))
    assert first.last_step == 3 and first.stop_signal == "SIGUSR1"
    second_step = ElasticDistillStep(job("split"))
    second = train(job("split"), step_fn=second_step)
    assert second.start_step == 3 and second.completed
    assert {**first.losses, **second.losses} == straight.losses
    for a, b in zip(straight_step.router.state_dict().values(), second_step.router.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight_step.generator.get_state(), second_step.generator.get_state())
    assert second.valid_loss == straight.valid_loss
    meta = metadata.read_common_state(root / "split")["meta"]
    assert [b["name"] for b in meta["elastic"]["budgets"]] == ["full", "medium", "small"]
    assert meta["sort_index"] == metadata.read_common_state(root / "sorted")["meta"]["sort_index"]


def test_stage2_continues_stage1_router_and_weights(sorted_parent):
    root, prefix = sorted_parent
    stage1 = _common(prefix, root / "s1", **{"elastic": "tiny_router", "elastic.teacher_checkpoint": str(root / "sorted"),
                                             "trainer.max_steps": 3})
    run("stage1_tiny", stage1)
    s1 = metadata.read_common_state(root / "s1")
    job2 = compose_job("stage2_tiny", _common(prefix, root / "s2", **{
        "elastic": "tiny_router", "elastic.teacher_checkpoint": str(root / "sorted"),
        "elastic.init_checkpoint": str(root / "s1"), "trainer.max_steps": 1, "data.seq_length": 64}))
    step = ElasticDistillStep(job2)
    from elastic_megatron.models.hybrid import build_model

    model = build_model(job2.model)
    step.setup(model, torch.float32)
    for k, v in s1["extra"]["router"]["params"].items():
        assert torch.equal(step.router.state_dict()[k], v)
    reference = build_model(job2.model)
    store.load_model_weights(root / "s1", reference)
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), k


def test_teacher_checkpoint_mismatch_is_refused_before_training(sorted_parent):
    root, prefix = sorted_parent
    cases = (
        ({"elastic.teacher_checkpoint": str(root / "sorted"), "model.hidden_size": 48}, "hidden_size: checkpoint 64 vs model 48"),
        ({"elastic.teacher_checkpoint": str(root / "parent")}, "not a sorted parent"),
        ({"elastic.teacher_checkpoint": str(root / "missing")}, "no checkpoint there"),
        ({"elastic.teacher_checkpoint": str(root / "sorted"), "elastic.init_checkpoint": str(root / "nowhere")}, "no checkpoint there"),
    )
    for overrides, message in cases:
        run_dir = root / "refused"
        with pytest.raises(ConfigError, match=message):
            dispatch(compose_job("stage1_tiny", _common(prefix, run_dir, **overrides)))
        assert not run_dir.exists()  # nothing written
    # The training loop alone does not guess the step function of an elastic job.
    with pytest.raises(ConfigError, match="elastic step function"):
        train(compose_job("stage1_tiny", _common(prefix, root / "refused", **{"elastic.teacher_checkpoint": str(root / "sorted")})))
    assert not (root / "refused").exists()


def test_router_input_interpolates_between_trained_budgets():
    cfg = preset("tiny")
    budgets = _router_budgets(cfg)
    router = BudgetRouter(budgets, cfg)
    mid = (budgets[0].target + budgets[1].target) / 2
    _, weights = router.budget_input(target=mid)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))
    _, exact = router.budget_input(target=budgets[1].target)
    torch.testing.assert_close(exact, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="outside the trained budgets"):
        router.budget_input(target=budgets[1].target / 2)


def test_soft_masks_blend_candidate_prefixes(dist):
    cfg = preset("tiny")
    weights = {"hidden": torch.tensor([0.25, 0.75]), "moe_experts": torch.tensor([0.5, 0.5])}
    masks = mixture_masks(cfg, {"hidden": [32, 64], "moe_experts": [4, 8]}, weights)
    assert masks.hidden[:32].eq(1).all() and masks.hidden[32:].eq(0.75).all()
    assert masks.moe_experts[:4].eq(1).all() and masks.moe_experts[4:].eq(0.5).all()
    model = randomised_model(cfg)
    hooks = ElasticHooks(model, cfg)
    ids, pos = token_batch(cfg.vocab_size)
    hooks.set(masks)
    soft = logits(model, ids, pos)
    hooks.set(hard_masks(cfg, full_widths(cfg).replace(hidden=32, moe_experts=4)))
    small = logits(model, ids, pos)
    hooks.remove()
    full = logits(model, ids, pos)
    assert torch.isfinite(soft).all()
    assert (soft - full).abs().max() > 1e-4 and (soft - small).abs().max() > 1e-4  # a blend, neither end


def test_per_layer_router_trains_and_records_heterogeneous_budgets(dist, sorted_parent):
    root, prefix = sorted_parent
    job = compose_job("stage1_tiny", _common(prefix, root / "per_layer", **{
        "elastic": "tiny_router", "elastic.teacher_checkpoint": str(root / "sorted"), "elastic.router.per_layer": "true",
        "trainer.max_steps": 2, "trainer.eval_interval": 2}))
    step = ElasticDistillStep(job)
    assert step.router.logits(*step.router.budget_input(1))["moe_ffn"].shape == (2, 4)  # 2 MoE layers x the 4 candidates of both budgets
    result = train(job, step_fn=step)
    assert result.completed
    budgets = metadata.read_common_state(root / "per_layer")["meta"]["elastic"]["budgets"]
    medium = budgets[1]["widths"]
    assert isinstance(medium["moe_ffn"], list) and len(medium["moe_ffn"]) == 2
    assert isinstance(medium["hidden"], int)  # the residual stream is shared by every layer
    from elastic_megatron.elastic.budgets import checkpoint_budgets
    from elastic_megatron.jobs.evaluate import budget_losses
    from elastic_megatron.models.hybrid import build_model

    model = build_model(job.model)
    store.load_model_weights(root / "per_layer", model)
    ids, pos = token_batch(job.model.vocab_size, seq=32)
    batch = {"tokens": ids, "position_ids": pos, "labels": torch.roll(ids, -1, 1), "loss_mask": torch.ones(ids.shape)}
    losses = budget_losses(model, job.model, checkpoint_budgets(root / "per_layer"), [batch])
    assert set(losses) == {"full", "medium", "small"} and all(torch.isfinite(torch.tensor(list(losses.values()))))


def test_nested_qad_resumes_exactly_and_keeps_one_set_of_scales(sorted_parent):
    """QAD (recipes/qad_tiny.yaml) from a stage-1 checkpoint: calibrated once, scales in
    every checkpoint, N steps straight == N/2, a signal, a resume and N/2 steps."""
    from elastic_megatron.quant.qad import QuantizedDistillStep

    root, prefix = sorted_parent
    run("stage1_tiny", _common(prefix, root / "q-s1", **{"elastic.teacher_checkpoint": str(root / "sorted"), "trainer.max_steps": 2}))

    def job(name):
        return compose_job("qad_tiny", _common(prefix, root / name, **{
            "elastic.teacher_checkpoint": str(root / "q-s1"), "trainer.max_steps": 4, "trainer.eval_interval": 4,
            "quant.calibration_batches": 2}))

    class QSignalAt(QuantizedDistillStep):
        def __call__(self, model, batch, step):
            if step == 2 and model.training:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().__call__(model, batch, step)

    straight = train(job("q-straight"), step_fn=QuantizedDistillStep(job("q-straight")))
    first = train(job("q-split"), step_fn=QSignalAt(job("q-split")))
    assert first.last_step == 2 and first.stop_signal == "SIGUSR1"
    second = train(job("q-split"), step_fn=QuantizedDistillStep(job("q-split")))
    assert second.start_step == 2 and second.completed
    assert {**first.losses, **second.losses} == straight.losses
    assert second.valid_loss == straight.valid_loss
    a, b = (metadata.read_common_state(root / n)["meta"]["quantization"] for n in ("q-straight", "q-split"))
    assert a == b and a["format"] == "nvfp4" and len(a["amax"]) > 20
    # The budgets are stage 1's resolved architectures; the BF16 elastic model is the teacher.
    meta = metadata.read_common_state(root / "q-split")["meta"]
    s1 = metadata.read_common_state(root / "q-s1")["meta"]
    assert [b["widths"] for b in meta["elastic"]["budgets"]] == [b["widths"] for b in s1["elastic"]["budgets"]]


def test_nested_qad_refuses_a_non_elastic_start(sorted_parent):
    root, prefix = sorted_parent
    job = compose_job("qad_tiny", _common(prefix, root / "q-refused", **{"elastic.teacher_checkpoint": str(root / "sorted")}))
    with pytest.raises(ConfigError, match="elastic.teacher_checkpoint.*elastic checkpoint"):
        dispatch(job)
    assert not (root / "q-refused" / "checkpoints").exists()
