"""Held-out evaluation (jobs/evaluate.py, tools/evaluate_elastic.py --data) and the
separately distilled baseline (recipes/distill_tiny.yaml):
- bits per byte from a known distribution, for the byte tokenizer and a byte-level BPE;
- `--data` evaluation equals the run's in-training validation on the same held-out data,
  for every budget; a sliced checkpoint evaluates to its elastic budget's numbers;
- the distillation baseline is the elastic step with one pinned budget: step for step the
  same losses as stage 1 sampling only that budget;
- bad input (tokenizer, prefix, budget) is refused by name, with nothing written."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import REPO, preprocess
from elastic_helpers import train_overrides

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.data.text import shipped_text
from elastic_megatron.data.tokenizer import ByteTokenizer, train_bpe
from elastic_megatron.elastic.step import ElasticDistillStep
from elastic_megatron.jobs.evaluate import EvalData, score_budgets
from elastic_megatron.train import compose_job, dispatch

SHAKESPEARE = shipped_text("tinyshakespeare")
TEXT = "Ünïcödé text: naïve café, 漢字 and emoji 🙂, then plain ASCII words. " * 3


def _tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate_elastic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class FixedDistribution(torch.nn.Module):
    """A language model that predicts the same known distribution `p` at every position."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.log_p = p.log()

    def forward(self, tokens, position_ids, attention_mask, labels):
        return -self.log_p[labels]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_bits_per_byte_from_a_known_distribution(kind, tmp_path):
    tok = ByteTokenizer() if kind == "byte" else train_bpe([TEXT * 4, "plain words and more words"], 300, tmp_path / "tok.json")
    ids = tok.encode(TEXT)
    if kind == "bpe":
        assert len(ids) < len(TEXT.encode("utf-8")) / 1.5  # merges: tokens stand for several bytes
    table = torch.tensor(tok.token_bytes())
    # Every token's byte count adds up to the text's UTF-8 length (multi-byte characters included).
    assert int(table[torch.tensor(ids)].sum()) == len(TEXT.encode("utf-8"))
    assert table[tok.eod] == 0
    vocab = tok.vocab_size
    p = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(0)), 0).double()
    # Predict the text after an end-of-document token: the labels are exactly the text's tokens.
    seq = torch.tensor([tok.eod] + ids)
    half = len(ids) // 2
    batches = [{"tokens": seq[None, s:e], "labels": seq[None, s + 1:e + 1], "position_ids": torch.arange(e - s)[None],
                "loss_mask": torch.ones(1, e - s)} for s, e in ((0, half), (half, len(ids)))]
    scores = score_budgets(FixedDistribution(p), None, [("full", None)], EvalData(batches, table, "", 0))["full"]
    nats = -p.log()[torch.tensor(ids)].sum().item()
    assert scores.tokens == len(ids) and scores.bytes == len(TEXT.encode("utf-8"))
    assert scores.loss == pytest.approx(nats / len(ids), rel=1e-12)
    assert scores.bits_per_byte == pytest.approx(nats / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-12)
    assert scores.ppl == pytest.approx(math.exp(nats / len(ids)), rel=1e-12)


@pytest.fixture(scope="module")
def heldout_prefix(tmp_path_factory) -> str:
    """English text (tinyshakespeare, shipped in the package) as a byte-level dataset: data the tiny
    runs never train on."""
    return preprocess(tmp_path_factory.mktemp("heldout") / "shakespeare", "--input", str(SHAKESPEARE), "--split-lines",
                      "--max-bytes", "40000", "--tokenizer", "byte")


@pytest.fixture(scope="module")
def elastic_run(sorted_parent, heldout_prefix):
    """A 3-step stage-1 run validated on the held-out data (data.valid_prefixes)."""
    root, prefix = sorted_parent
    job = compose_job("stage1_tiny", train_overrides(prefix, root / "eval_stage1", **{
        "elastic.teacher_checkpoint": str(root / "sorted"), "trainer.max_steps": 3, "trainer.eval_interval": 3,
        "data.valid_prefixes": f"[{heldout_prefix}]"}))
    result = dispatch(job)
    valid = [json.loads(line) for line in (root / "eval_stage1" / "metrics.jsonl").read_text().splitlines()]
    return root / "eval_stage1", next(r for r in reversed(valid) if "valid_loss" in r), result


def test_heldout_evaluation_equals_in_training_validation(elastic_run, heldout_prefix, tmp_path, capsys):
    run_dir, logged, _ = elastic_run
    out = tmp_path / "eval"
    code = _tool()(["--checkpoint", str(run_dir), "--data", heldout_prefix, "--batches", "2", "--micro-batch-size", "2",
                    "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["budget"]: r for r in json.loads((out / "evaluation.json").read_text())["rows"]}
    assert set(rows) == {"full", "medium", "small"}
    for name, row in rows.items():
        assert row["loss"] == pytest.approx(logged[f"{name}/valid_loss"], rel=1e-5, abs=1e-6), name
        assert row["tokens"] == 2 * 2 * 64
        # Byte tokenizer: bits per byte is the loss in bits over the bytes the labels stand for.
        assert row["bits_per_byte"] == pytest.approx(row["loss"] * row["tokens"] / math.log(2) / row["bytes"], rel=1e-9)
    assert rows["full"]["loss"] < rows["small"]["loss"]
    assert (out / "evaluation.png").stat().st_size > 0


def test_sliced_checkpoint_evaluates_to_its_elastic_budget(elastic_run, heldout_prefix, tmp_path, capsys):
    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    run_dir, _, _ = elastic_run
    sliced = slice_checkpoint(run_dir, tmp_path / "small", "small", precision="fp32")
    outs = {}
    for name, path in (("elastic", run_dir), ("sliced", sliced)):
        outs[name] = tmp_path / f"eval_{name}"
        assert _tool()(["--checkpoint", str(path), "--data", heldout_prefix, "--batches", "2", "--seq-length", "96",
                        "--budgets", "small", "--out", str(outs[name])]) == 0, capsys.readouterr().err
    elastic, sliced_rows = (json.loads((outs[k] / "evaluation.json").read_text())["rows"] for k in ("elastic", "sliced"))
    assert [r["budget"] for r in sliced_rows] == ["small"] and sliced_rows[0]["model"] == "model"
    assert sliced_rows[0]["loss"] == pytest.approx(elastic[0]["loss"], rel=1e-5)
    assert sliced_rows[0]["total_params"] == elastic[0]["total_params"] and sliced_rows[0]["tokens"] == 2 * 8 * 96


def test_distill_baseline_is_the_elastic_step_with_one_pinned_budget(sorted_parent, tmp_path):
    root, prefix = sorted_parent
    common = {"elastic.teacher_checkpoint": str(root / "sorted"), "trainer.max_steps": 3}
    distill = compose_job("distill_tiny", train_overrides(prefix, tmp_path / "distill", **common))
    only_small = compose_job("stage1_tiny", train_overrides(prefix, tmp_path / "stage1", **common,
                                                            **{"elastic.curriculum.budget_probs": "[0.0,0.0,1.0]"}))
    steps = {}
    for key, job in (("distill", distill), ("stage1", only_small)):
        steps[key] = ElasticDistillStep(job)  # what dispatch builds for both recipes
        result = dispatch(job, step_fn=steps[key])
        steps[key].result = result
    # Same teacher, init, loss, optimizer and data: the same losses, step for step.
    assert steps["distill"].result.losses == steps["stage1"].result.losses
    assert [b.name for b in steps["distill"].budgets] == ["small"]
    assert steps["distill"].budget_tokens == {"small": 3 * 4 * 64}
    assert steps["stage1"].budget_tokens == {"full": 0, "medium": 0, "small": 3 * 4 * 64}
    from elastic_megatron.checkpoint import metadata

    meta = metadata.read_common_state(tmp_path / "distill")["meta"]["elastic"]
    assert meta["student_budget"] == "small" and [b["name"] for b in meta["budgets"]] == ["small"]


def test_distill_budget_must_exist_and_be_pinned(sorted_parent, tmp_path):
    root, prefix = sorted_parent
    for extra, match in (({"elastic.student_budget": "huge"}, "allowed: \\['full', 'medium', 'small'\\]"),
                         ({"elastic": "tiny_router", "elastic.student_budget": "small"}, "router candidates")):
        job = compose_job("distill_tiny", train_overrides(prefix, tmp_path / "bad", **{
            "elastic.teacher_checkpoint": str(root / "sorted"), **extra}))
        with pytest.raises(ConfigError, match=match) as err:
            dispatch(job)
        assert err.value.key == "elastic.student_budget"
        assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def bpe_prefix(tmp_path_factory) -> str:
    return preprocess(tmp_path_factory.mktemp("bpe") / "shakespeare", "--input", str(SHAKESPEARE), "--split-lines",
                      "--max-bytes", "20000", "--train-bpe", "300")


@pytest.mark.parametrize("case", ["other tokenizer", "missing prefix", "unknown budget", "seq-length without data"])
def test_bad_evaluation_input_is_refused_with_nothing_written(case, elastic_run, heldout_prefix, bpe_prefix, tmp_path, capsys):
    run_dir, _, _ = elastic_run
    args, key, reason = {
        "other tokenizer": (["--data", bpe_prefix], "--data", "re-run tools/preprocess_data.py with the checkpoint's tokenizer"),
        "missing prefix": (["--data", str(tmp_path / "nothing_text_document")], "--data", "tools/preprocess_data.py"),
        "unknown budget": (["--data", heldout_prefix, "--budgets", "small,tiny"], "--budgets", "allowed: ['full', 'medium', 'small']"),
        "seq-length without data": (["--seq-length", "96"], "--seq-length", "applies to --data"),
    }[case]
    out = tmp_path / "out"
    assert _tool()(["--checkpoint", str(run_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid config {key}=") and reason in err, err
    assert not out.exists()
