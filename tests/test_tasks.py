"""Downstream tasks (tools/evaluate_tasks.py, jobs/tasks.py, eval_tasks/): lm-evaluation-harness
through a real server process (tools/serve.py on 127.0.0.1) over a tiny elastic checkpoint
with two budgets, run once for the module.

The harness's multiple-choice answers are those the model's own log-likelihoods give (the
masked full model at each budget, in this process: same log-likelihoods to 1e-4, identical
choices, the same accuracy), its generated answers are the generator's greedy text; nothing
reached for the network (only loopback connections, no name lookups); the table and figure
reach the checkpoint run's offline W&B. Bad input is refused before a server starts: an
unknown task, a task whose data are missing (named), an unknown budget, a precision the
server cannot serve yet.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import elastic_meta
from conftest import REPO, preset
from elastic_helpers import randomised_model
from elastic_megatron.checkpoint import store
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert.megatron_dist import config_yaml
from elastic_megatron.elastic.widths import Widths, full_widths
from elastic_megatron.eval_tasks import shipped_tasks
from elastic_megatron.eval_tasks.loader import read_rows
from elastic_megatron.jobs.tasks import TaskRequest, check_request, run_tasks

CFG = preset("tiny")
BUDGETS = {
    "full": full_widths(CFG),
    "small": Widths(hidden=32, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96, moe_ffn=32, moe_experts=6, shared_ffn=48),
}
LIMIT = 12
TASKS = ["stdlib_cloze", "stdlib_identifier"]
WANDB_ID = "tasks001"


@pytest.fixture(scope="module")
def checkpoint(dist, tmp_path_factory):
    """A random tiny elastic checkpoint of a run that logged to W&B offline."""
    run_dir = tmp_path_factory.mktemp("tasks") / "tinyelastic"
    logger = {"type": "wandb", "project": "elastic_megatron", "entity": None, "mode": "offline", "tags": []}
    store.save_checkpoint(run_dir, randomised_model(CFG, seed=29), None, None, 3, 0,
                          elastic_meta(CFG, BUDGETS, data={"tokenizer": {"type": "byte"}}, config=config_yaml(CFG, logger=logger)))
    (run_dir / "wandb_run_id.txt").write_text(WANDB_ID + "\n")
    return run_dir


class NetworkGuard:
    """Records every connection to a non-loopback address and every name lookup but localhost's."""

    def __init__(self, monkeypatch):
        self.attempts = []
        connect, lookup = socket.socket.connect, socket.getaddrinfo

        def guarded_connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
                self.attempts.append(("connect", address))
            return connect(sock, address)

        def guarded_lookup(host, *args, **kwargs):
            if host not in (None, "localhost") and not _is_loopback(host):
                self.attempts.append(("lookup", host))
            return lookup(host, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", guarded_connect)
        monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(host if isinstance(host, str) else host.decode()).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def generator(checkpoint):
    from elastic_megatron.inference.generator import ElasticGenerator

    return ElasticGenerator.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def evaluated(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks-out")
    with pytest.MonkeyPatch.context() as mp:
        guard = NetworkGuard(mp)
        result = run_tasks(TaskRequest(str(checkpoint), TASKS, str(out), limit=LIMIT, batch_size=4))
    return result, out, guard.attempts


def loglikelihoods(decoder, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log-probabilities of each continuation given its context, by the budget's cached
    decoder scoring the whole sequence as the server does for `echo` + `logprobs` (one prefill
    per sequence, every position's logits). The decoder equals the masked full forward at every
    position (tests/test_inference.py, invariant 10); the reference is the decoder and not that
    forward because MoE top-k is discontinuous: two correct computations that round differently
    can route a near-tied token (gap ~1e-6 between the k-th and next expert score, which random
    tiny models have among a few thousand tokens) to different experts, and one choice's
    log-likelihood then moves by nats."""
    out = []
    for ctx, cont in pairs:
        seq = ctx + cont
        logits, _ = decoder.prefill([seq], all_logits=True)
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        targets = torch.tensor(seq[1:])
        out.append(logp.gather(1, targets[:, None])[-len(cont):].sum().item())
    return out


@torch.no_grad()
def test_harness_choices_are_the_models_own_loglikelihoods(evaluated, generator):
    """For every document and budget: lm-eval's log-likelihood of each choice (through the
    server) equals the budget's own here (1e-4), so its choices and accuracy are the model's."""
    from elastic_megatron.data.tokenizer import tokenizer_from_description

    result, _, _ = evaluated
    tok = tokenizer_from_description({"type": "byte"})
    docs = read_rows("stdlib_cloze.jsonl")[:LIMIT]
    accuracies = {}
    for budget in BUDGETS:
        samples = sorted(result.samples[("elastic", "bf16", budget, "stdlib_cloze")], key=lambda s: s["doc_id"])
        assert [s["doc"]["context"] for s in samples] == [d["context"] for d in docs]
        # lm-eval's split: the context's trailing whitespace moves to the continuation
        pairs = [(tok.encode(d["context"].rstrip()), tok.encode(d["context"][len(d["context"].rstrip()):] + c))
                 for d in docs for c in d["choices"]]
        flat = loglikelihoods(generator.decoder(budget), pairs)
        hits = []
        for i, (doc, sample) in enumerate(zip(docs, samples)):
            ours = flat[i * len(doc["choices"]):(i + 1) * len(doc["choices"])]
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            assert theirs == pytest.approx(ours, abs=1e-4), (budget, sample["doc_id"])
            choice = max(range(len(ours)), key=ours.__getitem__)
            assert choice == max(range(len(theirs)), key=theirs.__getitem__)
            hits.append(choice == doc["label"])
        accuracies[budget] = sum(hits) / len(hits)
        reported = next(s for s in result.scores if (s.task, s.budget, s.metric) == ("stdlib_cloze", budget, "acc"))
        assert reported.value == pytest.approx(accuracies[budget]) and reported.samples == LIMIT


@torch.no_grad()
def test_generated_answers_are_the_generators_greedy_text(evaluated, generator):
    result, _, _ = evaluated
    gen = generator
    docs = read_rows("stdlib_identifier.jsonl")[:LIMIT]
    for budget in BUDGETS:
        samples = sorted(result.samples[("elastic", "bf16", budget, "stdlib_identifier")], key=lambda s: s["doc_id"])
        new, _ = gen.generate_ids([gen.encode(d["prompt"]) for d in docs], budget, 16)
        expected = [re.match(r"[A-Za-z0-9_]*", gen.tokenizer.decode(t)).group() for t in new]
        assert [s["filtered_resps"][0] for s in samples] == expected, budget
        reported = next(s for s in result.scores if (s.task, s.budget) == ("stdlib_identifier", budget))
        assert reported.metric == "exact_match"
        assert reported.value == pytest.approx(sum(e == d["answer"] for e, d in zip(expected, docs)) / LIMIT)


def test_outputs_and_wandb_and_no_network(evaluated, checkpoint):
    from wandb_records import history

    result, out, attempts = evaluated
    assert attempts == []  # lm-eval, datasets, the metrics and W&B offline reached for nothing beyond 127.0.0.1
    scores = json.loads((out / "results.json").read_text())["scores"]
    keys = {(s["task"], s["budget"], s["precision"], s["metric"]) for s in scores}
    assert keys == {(t, b, "bf16", m) for b in BUDGETS for t, m in
                    [("stdlib_cloze", "acc"), ("stdlib_cloze", "acc_norm"), ("stdlib_identifier", "exact_match")]}
    assert all(s["samples"] == LIMIT and s["seconds"] > 0 and s["stderr"] is not None for s in scores)
    table = (out / "results.md").read_text()
    assert "| elastic | bf16 | full |" in table and "| elastic | bf16 | small |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG" and not list(out.glob(".results*"))
    assert result.wandb_run == WANDB_ID
    (run_file,) = (checkpoint / "wandb").glob(f"offline-run-*-{WANDB_ID}/run-{WANDB_ID}.wandb")
    (logged,) = [row for row in history(run_file) if "tasks/results/_type" in row]
    assert logged["tasks/results/_type"] == "table-file" and logged["tasks/results/nrows"] == len(scores)
    assert logged["tasks/figure/_type"] == "image-file"


@torch.no_grad()
def test_budget_control_fields_reach_the_server_through_lm_eval(checkpoint, generator, tmp_path):
    """What benchmarks/budget_control.py runs: lm-eval's generation settings carry the server's
    budget-control fields; its texts are the generator's budget control (small thinks 3
    tokens, the delimiter forced, full answers up to the task's stop)."""
    from elastic_megatron.jobs.tasks import Served, _serve_argv, evaluate_model_id, resolve_tasks, running_server

    control = {"think_budget": "small", "answer_budget": "full", "max_think_tokens": 3, "think_delimiter": " = "}
    served = Served("elastic", "bf16", _serve_argv(str(checkpoint), "fp32"), "tinyelastic", list(BUDGETS), True)
    manager = resolve_tasks(["stdlib_assign"], [])
    with running_server(served, tmp_path / "server.log", 1, 300) as url:
        results, _ = evaluate_model_id(url, "tinyelastic:full", CFG.max_sequence_length, manager, "stdlib_assign", None, 1,
                                       gen_kwargs=control, doc_ids=[0, 1, 2], tokenize=False)
    texts = [s["resps"][0][0] for s in sorted(results["samples"]["stdlib_assign"], key=lambda s: s["doc_id"])]
    for doc, text in zip(read_rows("stdlib_assign.jsonl"), texts):
        trace, answer = generator.budget_control(doc["prompt"], "small", "full", " = ", 3, 48).texts
        assert trace.endswith(" = ") and text == trace + answer.split("\n")[0]


def test_list_tasks_prints_the_shipped_tasks():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate_tasks.py"), "--list-tasks"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == shipped_tasks() == ["shakespeare_cloze", "stdlib_assign", "stdlib_cloze",
                                                      "stdlib_identifier"]
    for name in shipped_tasks():  # every shipped task has its data
        assert read_rows(f"{name}.jsonl")


MISSING_TASK = """task: my_missing_task
custom_dataset: !function elastic_megatron.eval_tasks.loader.load
dataset_kwargs:
  data_file: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
"""


@pytest.mark.parametrize("change, key, says", [
    ({"tasks": ["no_such_task_anywhere"]}, "--tasks", "is not a task; shipped: ['shakespeare_cloze'"),
    ({"tasks": ["stdlib_cloze", "my_missing_task"]}, "--tasks", "'my_missing_task': its data are not available offline"),
    ({"budgets": ["medium"]}, "--budgets", "is not a budget of"),
    ({"qad": "QAD"}, "--qad", "applies to --precisions fp8/nvfp4"),
    ({"precisions": ["int4"]}, "--precisions", "allowed: ['bf16', 'fp8', 'nvfp4']"),
    ({"limit": 0}, "--limit", "must be a positive integer"),
])
def test_bad_input_is_refused_before_a_server_starts(checkpoint, tmp_path, change, key, says):
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "my_missing_task.yaml").write_text(MISSING_TASK.format(path=tmp_path / "gone.jsonl"))
    req = TaskRequest(str(checkpoint), ["stdlib_cloze"], str(tmp_path / "out"), include_paths=[str(tasks_dir)])
    for k, v in change.items():
        setattr(req, k, str(checkpoint) if v == "QAD" else v)
    with pytest.raises(ConfigError) as err:
        check_request(req)
    assert err.value.key == key and says in str(err.value), str(err.value)
    assert "gone.jsonl" in str(err.value) or "my_missing_task" not in change.get("tasks", [])
    assert not (tmp_path / "out").exists()
