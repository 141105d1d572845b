"""Inference (fp32, CPU): cached decoding equals the full forward at every position, on
every path of the decode step (eager and static, one and several tokens per step, rows at
one or at different positions, sequences joining and leaving a running state, fake
quantization, both router score functions); a budget's view model (views or contiguous
copies) equals the hard-masked parent and the sliced checkpoint; greedy generation equals
transformers' on the HF export of the slice; budget control's answer is the answer
budget's own greedy continuation (a plain forward of the sliced model, no cache); the
compiled step (torch.compile) gives the eager step's greedy tokens on every budget;
sampling is reproducible; bad input is one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import elastic_meta
from conftest import REPO, preset, small_config, token_batch
from elastic_helpers import logits, masked_logits, randomised_model
from elastic_megatron.checkpoint import metadata, store
from elastic_megatron.elastic.widths import Widths, full_widths
from elastic_megatron.inference.budgets import budget_model
from elastic_megatron.inference.decoder import HybridDecoder, token_logprobs
from elastic_megatron.inference.generator import ElasticGenerator, Sampling
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.slicing.zero_shot import slice_checkpoint

CFG = preset("tiny")  # Mamba chunk 32
# The paper's kind of budget (hidden and MoE FFN shrink: pure views) and one that also drops
# heads per group (a gathered copy for those rows).
BUDGETS = {
    "full": full_widths(CFG),
    "medium": Widths(hidden=48, attn_heads=4, mamba_heads=8, mamba_head_dim=16, ffn=128, moe_ffn=48, moe_experts=8, shared_ffn=64),
    "small": Widths(hidden=32, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96, moe_ffn=32, moe_experts=6, shared_ffn=48),
}
PROMPT_LENGTHS = (7, 45, 70)  # shorter and longer than the Mamba chunk, not multiples of it


@pytest.fixture(scope="module")
def elastic_run(dist, tmp_path_factory):
    model = randomised_model(CFG, seed=21)
    run_dir = tmp_path_factory.mktemp("inference") / "elastic"
    store.save_checkpoint(run_dir, model, None, None, 3, 0, elastic_meta(CFG, BUDGETS, data={"tokenizer": {"type": "byte"}}))
    return run_dir, model


@pytest.fixture(scope="module")
def generator(elastic_run):
    return ElasticGenerator.from_checkpoint(elastic_run[0])


def prompts(lengths=PROMPT_LENGTHS, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def full_forward_logits(model, seq: list[int]) -> torch.Tensor:
    """Logits at every position of `seq` by the model's own forward, no cache [len, vocab]."""
    device = next(model.parameters()).device
    return logits(model, torch.tensor([seq], device=device), torch.arange(len(seq), device=device)[None])[0]


def assert_cached_equals_full(dec: HybridDecoder, batch: list[list[int]], new: int, tol: float = 1e-5) -> torch.Tensor:
    """Prefill `batch`, decode `new` greedy tokens; every position's logits against the
    full forward of prompt + tokens so far (relative to the largest logit). Returns the
    cached logits [b, new + 1, vocab]."""
    logits_now, state = dec.prefill(batch, new)
    steps, seqs = [logits_now], [list(p) for p in batch]
    for _ in range(new):
        nxt = steps[-1].argmax(-1)
        for seq, token in zip(seqs, nxt.tolist()):
            seq.append(token)
        steps.append(dec.step(nxt, state))
    cached = torch.stack(steps, dim=1)  # [b, new + 1, vocab]
    for i, (prompt, seq) in enumerate(zip(batch, seqs)):
        full = full_forward_logits(dec.model, seq)[len(prompt) - 1:]
        rel = (cached[i, :len(full)] - full).abs().max() / full.abs().max()
        assert rel <= tol, (len(prompt), rel.item())
    return cached


# Every budget on the eager step (one row: the one-token MoE path; ragged rows: per-row
# positions and the routed MoE path); the static (CUDA-graph) step on the budget with
# gathered heads.
@pytest.mark.parametrize("budget, static", [*[(b, False) for b in BUDGETS], ("small", True)])
def test_cached_decoding_equals_full_forward_at_every_position(generator, budget, static):
    dec = generator.decoder(budget)
    if static:
        dec = HybridDecoder(dec.model, dec.cfg, static=True)
    assert_cached_equals_full(dec, prompts()[:1], 6)
    assert_cached_equals_full(dec, prompts(), 10)


def join_and_leave(dec: HybridDecoder, tol: float = 1e-5) -> None:
    """Continuous batching on one state: a request is prefilled into a free slot while
    others are mid-sequence, a finished one releases its slot (a hole inside the rows
    stepped), the slot is reused; every sequence's logits and log-probs are checked
    against its full forward."""
    state = dec.new_state(slots=3, max_len=80)
    a, b, c = prompts((20, 9, 33), seed=5)
    seqs, seen = {}, {}  # slot -> (tokens so far, prompt length), slot -> logits of each new position

    def join(prompt):
        slot = state.acquire()
        first, _ = dec.prefill([prompt], state=state, slots=[slot])
        seqs[slot], seen[slot] = (list(prompt), len(prompt)), [first[0]]
        return slot

    def steps(k):
        for _ in range(k):
            rows = state.span
            tokens = torch.zeros(rows, dtype=torch.long)
            for slot, (seq, _) in seqs.items():
                tokens[slot] = seen[slot][-1].argmax()
                seq.append(int(tokens[slot]))
            out = dec.step(tokens, state)
            assert out.shape[0] == rows
            chosen = token_logprobs(out, tokens)
            for slot in seqs:
                seen[slot].append(out[slot])
                torch.testing.assert_close(chosen[slot], torch.log_softmax(out[slot], -1)[tokens[slot]])

    def leave(slot):
        seq, prompt_len = seqs.pop(slot)
        got = torch.stack(seen.pop(slot))
        full = full_forward_logits(dec.model, seq)[prompt_len - 1:]
        assert ((got[:len(full)] - full).abs().max() / full.abs().max()).item() <= tol
        state.release(slot)

    slot_a = join(a)
    steps(3)
    slot_b = join(b)  # joins A, which is 3 tokens ahead
    steps(4)
    leave(slot_a)  # slot 0 free; B in slot 1 keeps decoding
    assert state.span == 2 and state.free_slots() == [0, 2]
    steps(2)
    assert join(c) == slot_a  # the freed slot is reused
    steps(3)
    leave(slot_b)
    leave(slot_a)
    assert state.span == 0


@pytest.mark.parametrize("static", [False, True])
def test_sequences_join_and_leave_a_running_state(generator, static):
    dec = generator.decoder("medium")
    join_and_leave(HybridDecoder(dec.model, dec.cfg, static=True) if static else dec)


def greedy(dec: HybridDecoder, batch: list[list[int]], new: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens [new steps][b] and logits [b, new + 1, vocab] of `batch` in a state of its own."""
    now, state = dec.prefill(batch, new)
    tokens, seen = [], [now]
    for _ in range(new):
        tokens.append(seen[-1].argmax(-1))
        seen.append(dec.step(tokens[-1], state))
    return [t.tolist() for t in tokens], torch.stack(seen, dim=1)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# The compiled step (torch.compile, inductor's C++ kernels on CPU: a compile takes ~10 s
# here) against the eager one: the same greedy tokens, every budget (the routed experts
# are an opaque operator in the graph on CPU; every expert weighted is the static step's,
# tested above).
@pytest.mark.slow
@pytest.mark.parametrize("budget", list(BUDGETS))
def test_compiled_step_gives_the_eager_greedy_tokens(generator, budget):
    eager = generator.decoder(budget)
    compiled = HybridDecoder(eager.model, eager.cfg, compiled=True)
    batch = prompts()
    want, want_logits = greedy(eager, batch, 12)
    got, got_logits = greedy(compiled, batch, 12)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4 * want_logits.abs().max().item())
    graphs = compiled_graphs()
    other = prompts((3, 20, 51), seed=9)  # another state (other length), other positions: no recompile
    assert greedy(compiled, other, 20)[0] == greedy(eager, other, 20)[0]
    assert compiled_graphs() == graphs
    if budget == "full":
        join_and_leave(compiled, tol=1e-4)  # three slots again: continuous batching, no recompile
        assert compiled_graphs() == graphs


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_cached_decoding_with_fake_quantization_equals_full_forward(dist, fmt):
    """QuantHooks wrap the linears' forward; the decode step calls wrapped linears through
    their module, so it quantizes exactly as the full forward does."""
    from elastic_megatron.quant.hooks import QuantHooks

    model = randomised_model(CFG, seed=7)
    batch = prompts((11, 30), seed=2)
    plain = full_forward_logits(model, batch[1])
    hooks = QuantHooks(model, fmt, "aggressive")
    try:
        ids, pos = token_batch(CFG.vocab_size, batch=2, seq=32, seed=1)
        hooks.calibrate(lambda: model(ids, pos, None))
        quantized = full_forward_logits(model, batch[1])
        assert ((quantized - plain).abs().max() / plain.abs().max()).item() > 1e-2  # the hooks do quantize
        for static in (False, True):
            assert_cached_equals_full(HybridDecoder(model, CFG, static=static), batch, 6, tol=1e-4)
    finally:
        hooks.remove()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_score_functions_and_dense_layers_decode_as_the_full_forward(dist, score):
    cfg = small_config("M-E*E", moe_router_score_function=score, moe_router_enable_expert_bias=score == "sigmoid",
                       moe_router_topk_scaling_factor=None if score == "softmax" else 2.5)
    model = randomised_model(cfg, seed=3)
    for static in (False, True):
        assert_cached_equals_full(HybridDecoder(model, cfg, static=static), prompts((5, 40), seed=4), 6)


def test_decoder_refuses_modules_with_hooks_it_would_bypass(dist):
    from elastic_megatron.elastic.masks import ElasticHooks

    model = randomised_model(CFG, seed=1)
    hooks = ElasticHooks(model, CFG)
    try:
        with pytest.raises(RuntimeError, match="forward hooks or a replaced forward.*view model"):
            HybridDecoder(model, CFG)
    finally:
        hooks.remove()
    HybridDecoder(model, CFG)  # no hooks left: accepted


def test_prefill_of_a_ragged_batch_equals_each_prompt_alone(generator):
    dec = generator.decoder("small")
    batch = prompts()
    together, _ = dec.prefill(batch, 0, all_logits=True)
    for i, p in enumerate(batch):
        alone, _ = dec.prefill([p], 0, all_logits=True)
        torch.testing.assert_close(together[i, -len(p):], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", ["medium", "small"])
def test_view_model_equals_hard_masked_parent_and_sliced_checkpoint(elastic_run, generator, budget, tmp_path):
    run_dir, parent = elastic_run
    view = generator.decoder(budget).model
    ids, pos = token_batch(CFG.vocab_size, batch=2, seq=40, seed=4)
    ours = logits(view, ids, pos)
    masked = masked_logits(parent, CFG, BUDGETS[budget], ids, pos)
    sliced_dir = slice_checkpoint(run_dir, tmp_path / budget, budget, precision="fp32")
    sub_cfg, _ = metadata.checkpoint_model_config(sliced_dir)
    sliced = build_model(sub_cfg)
    store.load_model_weights(sliced_dir, sliced)
    assert (ours - masked).abs().max().item() <= 1e-5
    assert (ours - logits(sliced.eval(), ids, pos)).abs().max().item() <= 1e-5


def test_budgets_share_the_parents_weights(generator):
    """One copy of the weights in memory: a hidden/MoE-FFN budget is views only; a budget
    that drops heads per group copies just those rows."""
    for name in BUDGETS:
        generator.decoder(name)
    medium, small = generator.view_stats["medium"], generator.view_stats["small"]
    parent_bytes = sum(p.numel() * p.element_size() for p in generator.parent.parameters())
    assert medium.copied_bytes == 0 and medium.shared_bytes > 0
    assert 0 < small.copied_bytes < 0.25 * parent_bytes
    shared = {p.untyped_storage().data_ptr() for p in generator.parent.parameters()}
    view_params = list(generator.decoder("medium").model.parameters())
    assert all(p.untyped_storage().data_ptr() in shared for p in view_params)


def test_contiguous_budget_copies_only_strided_weights_and_decodes_the_same(generator):
    """The opt-in contiguous copies: every parameter contiguous, the extra bytes counted,
    the same logits and the same greedy tokens as the views."""
    views = generator.decoder("medium")
    model, sub_cfg, stats = budget_model(generator.parent, CFG, BUDGETS["medium"], contiguous=True)
    assert all(p.is_contiguous() for p in model.parameters())
    strided = sum(p.numel() * p.element_size() for p in views.model.parameters() if not p.is_contiguous())
    assert strided > 0 and stats.copied_bytes == strided
    ids, pos = token_batch(CFG.vocab_size, batch=2, seq=40, seed=4)
    torch.testing.assert_close(logits(model, ids, pos), logits(views.model, ids, pos), rtol=1e-5, atol=1e-5)
    dec = HybridDecoder(model, sub_cfg)
    batch = prompts((12,), seed=8)
    tokens = []
    for d in (views, dec):
        out, state = d.prefill(batch, 16)
        seq = []
        for _ in range(16):
            seq.append(int(out.argmax()))
            out = d.step(out.argmax(-1), state)
        tokens.append(seq)
    assert tokens[0] == tokens[1]


def test_greedy_generation_matches_transformers_on_the_hf_export_of_the_slice(elastic_run, generator, tmp_path):
    """One prompt (the one-token step) and a ragged batch of two decoded together (rows at
    different positions), each against transformers' generate on that prompt alone."""
    from transformers import NemotronHForCausalLM

    run_dir, _ = elastic_run
    hf_dir = slice_checkpoint(run_dir, tmp_path / "hf", "medium", precision="fp32", fmt="hf")
    reference = NemotronHForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = prompts((23, 9), seed=9)
    alone, _ = generator.generate_ids(batch[:1], "medium", 64)
    together, _ = generator.generate_ids(batch, "medium", 48)
    for i, prompt in enumerate(batch):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=256,
                                        suppress_tokens=list(range(257, CFG.vocab_size)), pad_token_id=0)
        theirs = theirs[0, len(prompt):].tolist()
        if i == 0:
            assert alone[0] == theirs and len(theirs) == 64
        assert together[i] == theirs[:48]


def greedy_without_cache(model, ids: list[int], new: int) -> list[int]:
    """Greedy continuation by the model's plain forward over the whole sequence for every
    token (no cache), over the byte tokenizer's ids (rows past them are no tokens), ending
    at end-of-document as the generator does."""
    out = []
    for _ in range(new):
        token = int(full_forward_logits(model, ids + out)[-1, :257].argmax())
        if token == 256:
            break
        out.append(token)
    return out


def test_budget_control_answer_is_the_answer_budgets_own_continuation(elastic_run, generator, tmp_path):
    """The trace is the think budget's greedy text up to the delimiter; the answer is what
    the answer budget's sliced checkpoint writes after prompt + trace, computed by its plain
    forward token by token."""
    prompt = "def main(args):\n"
    ids = generator.encode(prompt)
    # A delimiter the think budget does write (two printable bytes of its own greedy trace,
    # computed without the decoder), so thinking ends at it rather than at the cap.
    small = generator.decoder("small").model
    trace = greedy_without_cache(small, ids, 48)
    cut = next(j for j in range(2, len(trace)) if all(32 <= t < 127 for t in trace[j - 1:j + 1])
               and bytes(trace[j - 1:j + 1]).decode() not in bytes(trace[:j - 1]).decode("utf-8", "replace"))
    delimiter = bytes(trace[cut - 1:cut + 1]).decode()
    out = generator.budget_control(prompt, "small", "medium", delimiter, max_think_tokens=48, max_answer_tokens=12)
    assert out.token_ids[0] == trace[:cut + 1] and out.texts[0].endswith(delimiter)
    sliced_dir = slice_checkpoint(elastic_run[0], tmp_path / "medium", "medium", precision="fp32")
    sliced = build_model(metadata.checkpoint_model_config(sliced_dir)[0])
    store.load_model_weights(sliced_dir, sliced)
    assert out.token_ids[1] == greedy_without_cache(sliced.eval(), ids + out.token_ids[0], 12)
    assert [p.budget for p in out.phases] == ["small", "medium"]
    assert out.phases[1].prompt_tokens == len(ids) + len(out.token_ids[0])
    # The cap: no delimiter within 5 thinking tokens -> forced, then the answer.
    capped = generator.budget_control(prompt, "small", "full", "\x01\x02", max_think_tokens=5, max_answer_tokens=4)
    assert capped.token_ids[0] == trace[:5] + [1, 2]
    assert capped.token_ids[1] == greedy_without_cache(generator.parent, ids + trace[:5] + [1, 2], 4)


def test_sampling_is_reproducible_for_a_seed(generator):
    batch = prompts((12, 30), seed=3)
    runs = [generator.generate_ids(batch, "small", 24, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=s))[0]
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_generate_tool_streams_and_reports_budget_control(elastic_run, tmp_path):
    run_dir, _ = elastic_run
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(run_dir), "--think-budget",
                           "small", "--answer-budget", "full", "--prompt", "x = ", "--max-think-tokens", "6",
                           "--max-new-tokens", "6", "--report", str(report)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("x = ") and "[small] prompt" in proc.stderr and "[full] prompt" in proc.stderr
    import json

    phases = json.loads(report.read_text())["phases"]
    assert [p["budget"] for p in phases] == ["small", "full"] and phases[0]["new_tokens"] <= 6


@pytest.mark.parametrize("args, says", [
    (["--budget", "tiny"], "allowed: ['full', 'medium', 'small']"),
    (["--prompt", ""], "must not be empty"),
    (["--max-new-tokens", "2000"], "model.max_sequence_length=1024"),
    (["--checkpoint", "nowhere"], "no checkpoint there"),
    (["--temperature", "-1"], "--temperature"),
])
def test_generate_tool_refuses_bad_input(elastic_run, args, says):
    base = {"--checkpoint": str(elastic_run[0]), "--prompt": "a", "--max-new-tokens": "4"}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = [x for kv in base.items() for x in kv]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_generate_tool_refuses_cuda_graphs_without_cuda(elastic_run, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_tool", REPO / "tools" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    code = tool.main(["--checkpoint", str(elastic_run[0]), "--prompt", "a", "--cuda-graph"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--cuda-graph" in lines[0] and "CUDA" in lines[0], lines


def test_budget_on_a_plain_checkpoint_is_refused(dist, tmp_path):
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.convert.megatron_dist import config_yaml

    store.save_checkpoint(tmp_path / "plain", randomised_model(CFG, seed=2), None, None, 1, 0,
                          {"config": config_yaml(CFG), "data": {"tokenizer": {"type": "byte"}}})
    gen = ElasticGenerator.from_checkpoint(tmp_path / "plain")
    assert gen.budget_names() == ["full"]
    with pytest.raises(ConfigError, match="is not an elastic checkpoint"):
        gen.generate(["a"], budget="small", max_new_tokens=2)
    assert len(gen.generate(["ab"], max_new_tokens=3).token_ids[0]) <= 3


def test_a_recorded_tokenizer_that_is_not_here_asks_for_tokenizer(dist, tmp_path):
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.convert.megatron_dist import config_yaml

    gone = {"type": "hf", "path": str(tmp_path / "elsewhere" / "tokenizer.json"), "eod_token": "</s>"}
    store.save_checkpoint(tmp_path / "plain", randomised_model(CFG, seed=2), None, None, 1, 0,
                          {"config": config_yaml(CFG), "data": {"tokenizer": gone}})
    with pytest.raises(ConfigError, match="pass --tokenizer"):
        ElasticGenerator.from_checkpoint(tmp_path / "plain")


def test_decoder_refuses_a_state_past_its_length(generator):
    dec: HybridDecoder = generator.decoder("full")
    _, state = dec.prefill([[1, 2, 3]], 1)
    dec.step(torch.tensor([4]), state)
    with pytest.raises(ValueError, match="past the 4 positions"):
        dec.step(torch.tensor([5]), state)
