"""Elastic specs: presets validate, every recipe composes, and bad specs fail with the
key, the value and what is allowed, before anything is built."""

from __future__ import annotations


import pytest

from conftest import REPO, preset

from elastic_megatron.config.elastic import BudgetConfig, ElasticConfig
from elastic_megatron.elastic.budgets import validate_elastic
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import validate_job
from elastic_megatron.elastic.widths import full_widths, model_cost
from elastic_megatron.train import compose_job

# Job recipes (describe_model.yaml is the describe tool's own config, not a job).
TOP_LEVEL = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml") if p.stem != "describe_model")


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_every_recipe_composes_and_validates(name):
    job = compose_job(name, ["elastic.parent_checkpoint=p", "elastic.teacher_checkpoint=t"])
    p = job.parallel
    # At-scale recipes are validated on the allocation their slurm script asks for (8 x 8 GPUs).
    validate_job(job, 64 if p.tp * p.pp * p.ep > 1 else 1)
    if job.elastic.enabled and job.run.task == "train":  # what the elastic step checks when it is built
        validate_elastic(job.elastic, job.model, p)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes" / "elastic").glob("*.yaml") if p.stem != "none"))
def test_every_elastic_preset_validates_against_its_model(name):
    model = "nemotron_nano_v3_30b" if name.startswith("star") else name if name in ("small", "fidelity") else "tiny"
    job = compose_job("stage1", [f"model={model}", f"elastic={name}", "elastic.teacher_checkpoint=t"])
    budgets = validate_elastic(job.elastic, job.model)
    assert budgets[0].fixed == full_widths(job.model) and not budgets[0].routed  # the first budget is the parent


def test_star_elastic_nano_v3_sizes_are_the_papers():
    job = compose_job("stage1", ["elastic.teacher_checkpoint=t"])
    budgets = validate_elastic(job.elastic, job.model)
    sizes = [(b.name, round(b.target / 1e9, 1), round(model_cost(job.model, b.fixed, "active_params") / 1e9, 1)) for b in budgets]
    assert sizes == [("30B", 31.6, 3.6), ("23B", 23.6, 2.9), ("12B", 12.4, 2.1)]
    assert budgets[1].fixed.hidden == 2304 and budgets[1].fixed.moe_ffn == 1600
    assert budgets[2].fixed.hidden == 1920 and budgets[2].fixed.moe_ffn == 960


def _spec(*budgets, **kw) -> ElasticConfig:
    return ElasticConfig(enabled=True, budgets=[BudgetConfig(name="full"), *budgets], **kw)


TINY = preset("tiny")
HALF = 0.6 * model_cost(TINY, full_widths(TINY))

BAD = [
    (_spec(BudgetConfig("b", candidates={"attn_heads": [2, 3]}, target=HALF)), "elastic.budgets[1].candidates.attn_heads", "query groups"),
    (_spec(BudgetConfig("b", candidates={"mamba_heads": [5]}, target=HALF)), "elastic.budgets[1].candidates.mamba_heads", "Mamba groups"),
    (_spec(BudgetConfig("b", widths={"hidden": 96})), "elastic.budgets[1].widths.hidden", "between 1 and"),
    (_spec(BudgetConfig("b", widths={"moe_experts": 1})), "elastic.budgets[1].widths.moe_experts", "moe_router_topk"),
    (_spec(BudgetConfig("b", candidates={"hidden": [56, 64]}, target=1000)), "elastic.budgets[1].target", "no candidate reaches it"),
    (_spec(BudgetConfig("b", widths={"hidden": 32}), BudgetConfig("c", widths={"hidden": 48})), "elastic.budgets[2].target", "largest first"),
    (_spec(BudgetConfig("b", widths={"hidden": 32}, target=HALF)), "elastic.budgets[1].target", "pinned widths give"),
    (_spec(BudgetConfig("b", candidates={"width": [1]}, target=HALF)), "elastic.budgets[1].candidates.width", "unknown axis"),
    (_spec(BudgetConfig("b", candidates={"hidden": [32, 48]})), "elastic.budgets[1].target", "needs a target"),
    (_spec(BudgetConfig("b", widths={"hidden": 32}, candidates={"hidden": [32]}, target=HALF)), "elastic.budgets[1].candidates.hidden", "not both"),
    (_spec(BudgetConfig("b", target_kind="flops", widths={"hidden": 32})), "elastic.budgets[1].target_kind", "total_params"),
    (_spec(BudgetConfig("full", widths={"hidden": 32})), "elastic.budgets", "unique"),
]


@pytest.mark.parametrize("spec,key,allowed", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_spec_names_key_and_allowed(spec, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate_elastic(spec, TINY)
    assert err.value.key == key
    assert allowed in str(err.value)


def test_axis_the_model_does_not_have():
    cfg = preset("tiny", hybrid_pattern="M*E")  # no dense MLP
    with pytest.raises(ConfigError, match="no ffn axis"):
        validate_elastic(_spec(BudgetConfig("b", widths={"ffn": 32})), cfg)


def test_curriculum_and_distill_checks():
    job = compose_job("stage2_tiny", ["elastic.teacher_checkpoint=t"])
    validate_elastic(job.elastic, job.model)
    for overrides, key in (
        (["elastic.curriculum.budget_probs=[0.5,0.5]"], "elastic.curriculum.budget_probs"),
        (["elastic.curriculum.budget_probs=[0.5,0.3,0.3]"], "elastic.curriculum.budget_probs"),
        (["elastic.curriculum.budgets_per_batch=4"], "elastic.curriculum.budgets_per_batch"),
        (["elastic.distill.temperature=0"], "elastic.distill.temperature"),
        (["elastic.distill.top_k=100000"], "elastic.distill.top_k"),
        (["model.backend=te"], "model.backend"),
    ):
        job = compose_job("stage2_tiny", ["elastic.teacher_checkpoint=t", *overrides])
        with pytest.raises(ConfigError) as err:
            validate_elastic(job.elastic, job.model, job.parallel)
        assert err.value.key == key, overrides


def test_elastic_training_needs_a_teacher_and_importance_a_parent():
    with pytest.raises(ConfigError) as err:
        validate_job(compose_job("stage1_tiny"))
    assert err.value.key == "elastic.teacher_checkpoint"
    with pytest.raises(ConfigError) as err:
        validate_job(compose_job("importance_tiny"))
    assert err.value.key == "elastic.parent_checkpoint"
