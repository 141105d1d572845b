"""The OpenAI-compatible server (serving/, tools/serve.py) as its clients see it: one real
server process (tools/serve.py on 127.0.0.1, a port it picks, an API key) over a tiny
elastic checkpoint with three budgets, driven by the `openai` client and httpx.

Greedy answers through the server equal tools/generate.py's and the generator's (alone
or in a batch with other budgets, streaming or not, chat, budget control); scored prompt
log-probs equal the model's own log-softmax and parse as lm-evaluation-harness parses them;
a bounded load with streams and clients that leave mid-stream loses, duplicates and changes
nothing and gives back its slots; beyond the queue bound 429 with Retry-After; bad input is
a 400 naming the field, and the next request is served; SIGTERM under load lets the streams
finish and exits 0. A plain (non-elastic) checkpoint is served in-process by uvicorn in a
thread (budget control refused there).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from checkpoint_helpers import elastic_meta
from conftest import REPO, preset, serving_in_thread
from elastic_helpers import logits, randomised_model
from elastic_megatron.checkpoint import store
from elastic_megatron.elastic.widths import Widths, full_widths
from elastic_megatron.inference.generator import ElasticGenerator
from elastic_megatron.jobs.tasks import stop_server

CFG = preset("tiny")
BUDGETS = {
    "full": full_widths(CFG),
    "medium": Widths(hidden=48, attn_heads=4, mamba_heads=8, mamba_head_dim=16, ffn=128, moe_ffn=48, moe_experts=8, shared_ffn=64),
    "small": Widths(hidden=32, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96, moe_ffn=32, moe_experts=6, shared_ffn=48),
}
NAME, KEY = "tinyelastic", "test-key"
MAX_BATCH, MAX_QUEUE = 4, 6


@pytest.fixture(scope="module")
def checkpoint(dist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serving") / NAME
    store.save_checkpoint(run_dir, randomised_model(CFG, seed=21), None, None, 3, 0,
                          elastic_meta(CFG, BUDGETS, data={"tokenizer": {"type": "byte"}}))
    return run_dir


@pytest.fixture(scope="module")
def generator(checkpoint):
    """The reference: the generator tools/generate.py runs, in this process."""
    return ElasticGenerator.from_checkpoint(checkpoint)


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def http(self, key: str | None = KEY, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60, **kwargs)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: 'name{labels}' -> value."""
        text = self.http().get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


@pytest.fixture(scope="module")
def server(checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--checkpoint", str(checkpoint), "--port", "0",
                             "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                             "--grace-period", "60"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving <name> on http://127.0.0.1:<port>/v1" once it accepts requests
    assert line.startswith(f"serving {NAME} on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
    yield ServerProcess(proc, line.split()[-1].removesuffix("/v1"))
    stop_server(proc, grace_s=30)


def solo(generator, prompt: str, budget: str, max_tokens: int) -> list[int]:
    """Greedy new tokens of `prompt` alone at `budget` (the generator's own loop)."""
    return generator.generate_ids([generator.encode(prompt)], budget, max_tokens)[0][0]


def solo_control(generator, prompt: str, think: str, answer: str, delimiter: str, max_think: int, max_answer: int) -> list[int]:
    out = generator.budget_control(prompt, think, answer, delimiter, max_think_tokens=max_think, max_answer_tokens=max_answer)
    return out.token_ids[0] + out.token_ids[1]


def text_of(generator, tokens: list[int]) -> str:
    return generator.tokenizer.decode(tokens)


def sse_texts(lines, field=("text",)) -> tuple[str, list[dict]]:
    """(the concatenated text, every chunk) of an SSE stream; asserts it ends with [DONE]."""
    chunks, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
            continue
        chunks.append(json.loads(line[6:]))
    assert done, "the stream did not end with data: [DONE]"
    text = ""
    for c in chunks:
        for choice in c["choices"]:
            value = choice
            for key in field:
                value = (value or {}).get(key)
            text += value or ""
    return text, chunks


# ---- the API ----------------------------------------------------------------------------------


def test_health_is_open_the_rest_needs_the_key_and_models_list_every_budget(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for path in ("/v1/models", "/metrics", "/tokenizer_info"):
        denied = server.http(key=None).get(path)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key", path
    assert server.http(key="wrong").get("/v1/models").status_code == 401
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [NAME] + [f"{NAME}:{b}" for b in BUDGETS]
    assert [m.model_extra["budget"] for m in models.data] == ["full", *BUDGETS]
    metrics = server.http().get("/metrics").text
    for name in ("queue_depth", "running_sequences", "generated_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket"):
        assert f"elastic_megatron_{name}" in metrics, name


def test_greedy_tokens_equal_the_generate_tool(server, checkpoint, tmp_path):
    """tools/generate.py (a batch of two prompts at budget small) and the server (each prompt
    its own request, the tokens read back as ids) give the same tokens."""
    prompts = ["def parse(args):", "The quick brown fox"]  # one per line in the file
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(checkpoint), "--budget", "small",
                           "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "12", "--report", str(report)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = json.loads(report.read_text())
    client = server.openai()
    for prompt, tokens, text in zip(prompts, expected["token_ids"], expected["texts"]):
        out = client.completions.create(model=f"{NAME}:small", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                        extra_body={"return_tokens_as_token_ids": True})
        choice = out.choices[0]
        assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == tokens
        assert choice.text == text
        assert out.usage.completion_tokens == len(tokens) and out.usage.prompt_tokens == len(prompt.encode())


def test_every_budget_completion_stream_and_chat_equal_the_generator(server, generator):
    client = server.openai()
    prompt = "class Tokenizer:\n    def"
    for budget in BUDGETS:
        expected = text_of(generator, solo(generator, prompt, budget, 10))
        out = client.completions.create(model=f"{NAME}:{budget}", prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == expected, budget
        assert out.usage.phases == [{"index": 0, "phase": "generate", "budget": budget, "prompt_tokens": len(prompt),
                                     "completion_tokens": 10, "seconds": out.usage.phases[0]["seconds"]}]
        stream = client.completions.create(model=f"{NAME}:{budget}", prompt=prompt, max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected, budget
    # the budget as a body field, two prompts in one request (two choices), echo
    out = client.completions.create(model=NAME, prompt=[prompt, "x = "], max_tokens=6, temperature=0, echo=True,
                                    extra_body={"budget": "medium"})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        p + text_of(generator, solo(generator, p, "medium", 6)) for p in (prompt, "x = ")]
    # one event is one line, even with characters line readers split on (httpx's iter_lines does)
    breaks = "a\u2028b\x85c\u2029"
    with server.http().stream("POST", "/v1/completions", json={"prompt": breaks, "max_tokens": 4, "temperature": 0,
                                                               "echo": True, "stream": True}) as r:
        assert sse_texts(list(r.iter_lines()))[0] == breaks + text_of(generator, solo(generator, breaks, "full", 4))
    # chat: the byte tokenizer has no template, so the plain one ("Role: content" lines, then "Assistant:")
    info = server.http().get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "Assistant:" in info["chat_template"]
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime."}]
    rendered = "System: Be terse.\nUser: Name a prime.\nAssistant:"
    expected = text_of(generator, solo(generator, rendered, "small", 8))
    chat = client.chat.completions.create(model=f"{NAME}:small", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == expected and chat.usage.prompt_tokens == len(rendered)
    stream = client.chat.completions.create(model=f"{NAME}:small", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 8


def test_sampling_is_reproducible_for_a_seed(server, generator):
    from elastic_megatron.inference.generator import Sampling

    client = server.openai()
    runs = [client.completions.create(model=f"{NAME}:small", prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=s,
                                      extra_body={"top_k": 50}).choices[0].text for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]
    ids = generator.generate_ids([generator.encode("abc")], "small", 12, Sampling(1.0, 50, 0.9, 5))[0][0]
    assert runs[0] == text_of(generator, ids)  # the generator's sampler, with the request's seed


def test_prompt_logprobs_are_the_models_log_softmax(server, generator):
    """echo + max_tokens=0 + logprobs=1 scores the prompt: each token's log-prob is the
    model's own log-softmax at the position before (1e-5); with lm-evaluation-harness's
    payload (token ids, max_tokens=1) its parser reads the continuation's log-likelihood."""
    http = server.http()
    ids = generator.encode("def add(a, b):\n    return a + b\n")
    for budget in ("full", "small"):
        model = generator.decoder(budget).model
        reference = torch.log_softmax(logits(model, torch.tensor([ids]), torch.arange(len(ids))[None])[0], dim=-1)
        body = http.post("/v1/completions", json={"model": f"{NAME}:{budget}", "prompt": ids, "echo": True, "max_tokens": 0,
                                                   "logprobs": 1, "temperature": 0}).json()
        lp = body["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
        got = torch.tensor(lp["token_logprobs"][1:])
        want = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert (got - want).abs().max() <= 1e-5, budget
        assert lp["tokens"] == [chr(i) for i in ids] and lp["text_offset"] == list(range(len(ids)))
        best = reference[:-1].max(-1).values  # each position's top-1 is among its top_logprobs
        assert all(abs(max(top.values()) - b) <= 1e-5 for top, b in zip(lp["top_logprobs"][1:], best.tolist()))
        assert body["choices"][0]["text"] == "def add(a, b):\n    return a + b\n" and body["usage"]["completion_tokens"] == 0

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    context, continuation = ids[:20], ids[20:]
    payload = {"model": f"{NAME}:small", "prompt": [context + continuation], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}  # what LocalCompletionsAPI._create_payload sends for a log-likelihood
    out = http.post("/v1/completions", json=payload).json()
    [(loglikelihood, is_greedy)] = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[len(context)])
    reference = torch.log_softmax(logits(generator.decoder("small").model, torch.tensor([ids]), torch.arange(len(ids))[None])[0], -1)
    want = reference[torch.arange(len(context) - 1, len(ids) - 1), torch.tensor(continuation)]
    assert abs(loglikelihood - float(want.sum())) <= 1e-4
    assert is_greedy == bool((reference[len(context) - 1:-1].argmax(-1) == torch.tensor(continuation)).all())
    assert http.post("/tokenize", json={"prompt": "ab<|endoftext|>", "add_special_tokens": False}).json()["tokens"] == [97, 98, 256]
    assert http.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}


def test_budget_control_equals_the_generators(server, generator):
    """The trace at the think budget until the delimiter (one the small budget does write,
    and one it never writes: forced at the cap), then the answer at the answer budget."""
    prompt = "def main(args):\n"
    trace = solo(generator, prompt, "small", 40)
    cut = next(j for j in range(2, len(trace)) if all(32 <= t < 127 for t in trace[j - 1:j + 1])
               and bytes(trace[j - 1:j + 1]).decode() not in bytes(trace[:j - 1]).decode("utf-8", "replace"))
    written = bytes(trace[cut - 1:cut + 1]).decode()
    client = server.openai()
    for delimiter, think, expect_think in ((written, 40, cut + 1), ("\x01\x02", 5, 5)):
        expected = solo_control(generator, prompt, "small", "full", delimiter, think, 8)
        extra = {"think_budget": "small", "answer_budget": "full", "max_think_tokens": think, "think_delimiter": delimiter}
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
        assert out.choices[0].text == text_of(generator, expected)
        think_phase, answer_phase = out.usage.phases
        assert (think_phase["budget"], think_phase["completion_tokens"]) == ("small", expect_think)
        assert (answer_phase["budget"], answer_phase["completion_tokens"]) == ("full", 8)
        assert answer_phase["prompt_tokens"] == len(prompt) + len(expected) - 8
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=extra)
        assert "".join(c.choices[0].text for c in stream) == text_of(generator, expected)


def test_stop_strings_end_the_text_before_them(server, generator):
    client = server.openai()
    prompt = "for i in range(10):"
    text = text_of(generator, solo(generator, prompt, "full", 16))
    printable = [i for i in range(2, len(text) - 1) if text[i].isprintable() and text[i] not in text[:i] and text[i] != "\ufffd"]
    stop = text[printable[0]]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "\x00\x00"])
    assert out.choices[0].text == text[:printable[0]] and out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text[:printable[0]]


@pytest.mark.parametrize("body, param", [
    ("{not json", "body"),
    ({"prompt": "a", "model": "other-model"}, "model"),
    ({"prompt": "a", "budget": "huge"}, "budget"),
    ({"prompt": "a", "model": f"{NAME}:small", "budget": "full"}, "budget"),
    ({"prompt": "a", "max_tokens": 1024}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": -5}, "top_k"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "logprobs": 99}, "logprobs"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 999]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "think_budget": "small"}, "answer_budget"),
    ({"prompt": "a", "think_budget": "tiny", "answer_budget": "full"}, "think_budget"),
    ({"prompt": "a", "think_budget": "small", "answer_budget": "full", "max_tokens": 900}, "max_tokens"),
    ({"prompt": "a", "think_budget": "small", "answer_budget": "full", "logprobs": 1}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    # lone UTF-16 surrogates: valid JSON (written raw: httpx would not encode them), no character
    ('{"prompt": "\\ud800 abc"}', "prompt"),
    ('{"prompt": ["ok", "\\udfff"]}', "prompt"),
    ('{"prompt": "a", "stop": ["\\ud800"]}', "stop"),
    ('{"prompt": "a", "think_budget": "small", "answer_budget": "full", "think_delimiter": "\\ud800"}', "think_delimiter"),
    ('{"prompt": "a", "model": "\\ud800"}', "model"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages.0.content"),
    ('{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}', "messages.0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": ["\\ud800"]}}', "chat_template_kwargs"),
    # bounds and odd values
    ({"prompt": "a", "stop": [chr(97 + i) for i in range(17)]}, "stop"),
    ({"prompt": "a", "stop": "x" * 257}, "stop"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": ["a"] * (MAX_BATCH + MAX_QUEUE + 1)}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ({"prompt": "a", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "a"}] * 1025}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_input_is_a_400_naming_the_field_and_serving_goes_on(server, body, param):
    http = server.http()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if isinstance(body, str):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == param, r.text
    assert param.split(".")[0] in error["message"]
    assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_tokenizer_routes_refuse_a_lone_surrogate(server):
    r = server.http().post("/tokenize", content='{"prompt": "ab\\udc00"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.json()["error"]["message"]
    assert server.http().post("/tokenize", json={"prompt": "ab"}).json()["tokens"] == [97, 98]


def test_extreme_but_valid_values_are_served(server, generator):
    """Sampling values whose fp32 form is 0 or inf (temperature 1e-300 / 1e300, top_p
    1e-300) sample without NaN: the two tiny ones leave only the best token, the greedy
    answer; an assistant message without content is accepted, as OpenAI does."""
    http = server.http()
    greedy = text_of(generator, solo(generator, "for i in", "full", 6))
    for extreme in ({"temperature": 1e-300}, {"top_p": 1e-300}):
        r = http.post("/v1/completions", json={"prompt": "for i in", "max_tokens": 6, "seed": 3, **extreme})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extreme, r.text)
    r = http.post("/v1/completions", json={"prompt": "for i in", "max_tokens": 6, "temperature": 1e300, "seed": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"), r.text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]
    assert http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).status_code == 200


# ---- load -------------------------------------------------------------------------------------


def test_bounded_load_mixed_budgets_streams_and_disconnects(server, generator):
    """6 clients x 3 requests, all budgets and budget control, some streamed, some streams
    dropped after two chunks: every finished answer is its solo greedy answer, each once;
    no 429 (never more than --max-queue waiting); the dropped sequences stop generating;
    slots, queue and memory back to idle."""
    import psutil

    kinds = ["plain", "stream", "disconnect", "control", "plain", "stream"]
    budgets = list(BUDGETS)
    jobs = []  # (client, request, kind, budget, prompt, expected tokens)
    for c in range(6):
        for r in range(3):
            kind, budget, prompt = kinds[(c + r) % 6], budgets[(c + 2 * r) % 3], f"# client {c}, request {r}\n"
            if kind == "control":
                expected = solo_control(generator, prompt, "small", budget, "</think>", 6, 10)
            elif kind == "disconnect":
                expected = None
            else:
                expected = solo(generator, prompt, budget, 10)
            jobs.append((c, r, kind, budget, prompt, expected))
    rss = psutil.Process(server.proc.pid).memory_info().rss
    before = server.metrics()

    async def request(client: httpx.AsyncClient, kind, budget, prompt):
        body = {"model": f"{NAME}:{budget}", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        if kind == "control":
            body.update(model=NAME, think_budget="small", answer_budget=budget, max_think_tokens=6)
        if kind in ("plain", "control"):
            r = await client.post("/v1/completions", json=body)
            return r.status_code, r.json().get("id"), r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
        if kind == "disconnect":
            body["max_tokens"] = 900  # would run ~900 steps if not cancelled
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if kind == "disconnect" and sum(x.startswith("data: ") for x in lines) == 2:
                    return r.status_code, None, None  # leaving: the connection is closed mid-stream
        text, chunks = sse_texts(lines)
        assert len({c["id"] for c in chunks}) == 1
        return r.status_code, chunks[0]["id"], text

    async def client_loop(c):
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            return [(c, r, *(await request(client, kind, budget, prompt)))
                    for (cc, r, kind, budget, prompt, _) in jobs if cc == c]

    async def everyone():
        return [x for xs in await asyncio.gather(*(client_loop(c) for c in range(6))) for x in xs]

    results = {(c, r): (status, rid, text) for c, r, status, rid, text in asyncio.run(everyone())}
    assert len(results) == len(jobs)
    ids = [rid for status, rid, _ in results.values() if rid is not None]
    assert len(ids) == len(set(ids)) == sum(j[2] != "disconnect" for j in jobs)  # one answer each, none twice
    for c, r, kind, budget, prompt, expected in jobs:
        status, _, text = results[c, r]
        assert status == 200, (c, r, kind, text)  # never a 429: at most 6 sequences wait, the bound is 6
        if expected is not None:
            assert text == text_of(generator, expected), (c, r, kind, budget)
    deadline = time.time() + 10
    while True:  # the dropped streams' slots come back once the server notices (at its next step)
        after = server.metrics()
        running = sum(v for k, v in after.items() if k.startswith("elastic_megatron_running_sequences"))
        if (running == 0 and after["elastic_megatron_queue_depth"] == 0) or time.time() > deadline:
            break
        time.sleep(0.1)
    assert running == 0 and after["elastic_megatron_queue_depth"] == 0
    generated = sum(after[k] - before.get(k, 0) for k in after if k.startswith("elastic_megatron_generated_tokens_total"))
    finished = sum(len(e) for *_, e in jobs if e is not None)  # a forced delimiter is in there but not generated
    forced = len("</think>") * sum(j[2] == "control" for j in jobs)
    dropped = sum(j[2] == "disconnect" for j in jobs)
    assert finished - forced <= generated < finished + dropped * 300, (generated, finished)  # not 900 each: cancelled
    assert psutil.Process(server.proc.pid).memory_info().rss - rss < 64 * 2**20


def test_beyond_the_queue_bound_requests_get_429_with_retry_after(server):
    """16 requests at once for one budget: 4 slots + 6 waiting may be held, the rest are
    refused (429, Retry-After); none below the bound is."""
    async def one(client):
        r = await client.post("/v1/completions", json={"model": f"{NAME}:full", "prompt": "x", "max_tokens": 400, "temperature": 0})
        return r.status_code, r.headers.get("retry-after"), r.json()

    async def burst():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) + len(refused) == 16 and len(ok) >= MAX_BATCH + MAX_QUEUE and refused, [r[0] for r in results]
    for _, retry_after, body in refused:
        assert int(retry_after) >= 1 and body["error"]["type"] == "rate_limit_error" and "--max-queue" in body["error"]["message"]
    assert len({r[2]["choices"][0]["text"] for r in ok}) == 1  # the same prompt, the same greedy answer in every batch


# ---- elsewhere: a plain checkpoint, refusals, the warning -------------------------------------------


def test_a_plain_checkpoint_runs_at_the_budgets_of_an_elastic_one(dist, checkpoint, generator, tmp_path):
    """tools/serve.py --budgets-from (the task job's sorted baselines): a plain checkpoint
    served at an elastic checkpoint's budgets. Saved plain here are the elastic checkpoint's
    own weights (its sort is the identity), so every budget's greedy tokens are the elastic
    checkpoint's; a source that records no budgets is refused by name."""
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.convert.megatron_dist import config_yaml

    store.save_checkpoint(tmp_path / "plain", randomised_model(CFG, seed=21), None, None, 1, 0,
                          {"config": config_yaml(CFG), "data": {"tokenizer": {"type": "byte"}}})
    gen = ElasticGenerator.from_checkpoint(tmp_path / "plain", budgets_from=checkpoint)
    assert gen.budgets == generator.budgets and gen.elastic
    for budget in generator.budget_names():
        assert solo(gen, "def f(", budget, 6) == solo(generator, "def f(", budget, 6), budget
    with pytest.raises(ConfigError, match="is not elastic"):
        ElasticGenerator.from_checkpoint(tmp_path / "plain", budgets_from=tmp_path / "plain")


def test_a_plain_checkpoint_is_served_and_refuses_budget_control(dist, tmp_path):
    from elastic_megatron.convert.megatron_dist import config_yaml
    from elastic_megatron.serving.app import Server
    from elastic_megatron.serving.options import ServeOptions

    store.save_checkpoint(tmp_path / "plain", randomised_model(CFG, seed=2), None, None, 1, 0,
                          {"config": config_yaml(CFG), "data": {"tokenizer": {"type": "byte"}}})
    gen = ElasticGenerator.from_checkpoint(tmp_path / "plain")
    server = Server(gen, "plain", ServeOptions(max_batch=2, max_queue=2, max_model_len=128))
    with serving_in_thread(server) as url:
        http = httpx.Client(base_url=url, timeout=60)
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["plain", "plain:full"]
        r = http.post("/v1/completions", json={"prompt": "a", "think_budget": "full", "answer_budget": "full"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "think_budget" and "elastic" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 127})
        assert r.status_code == 400 and "128" in r.json()["error"]["message"]  # --max-model-len
        out = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5, "temperature": 0}).json()
        assert out["choices"][0]["text"] == gen.generate(["ab"], max_new_tokens=5).texts[0]
    assert not server.scheduler.alive


@pytest.mark.slow
def test_a_compiled_server_gives_the_generators_tokens(dist, checkpoint, generator):
    """tools/serve.py --compile: the decode step of every budget compiled at start-up (the
    warm-up), then concurrent greedy requests of every budget, batched together on the
    server's slots, give the eager generator's tokens (invariant 13), with no compile
    while serving."""
    from concurrent.futures import ThreadPoolExecutor

    from torch._dynamo.utils import counters

    from elastic_megatron.serving.app import Server
    from elastic_megatron.serving.options import ServeOptions

    gen = ElasticGenerator.from_checkpoint(checkpoint, compiled=True)
    before = counters["stats"]["unique_graphs"]
    server = Server(gen, NAME, ServeOptions(max_batch=3, max_queue=8, max_model_len=256))
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start > before and all(d.compiled for d in server.scheduler.decoders.values())
    with serving_in_thread(server) as url:
        http = httpx.Client(base_url=url, timeout=120)
        asks = [(budget, prompt) for budget in BUDGETS for prompt in ("def parse(args):", "x = [", "The quick brown fox")]

        def ask(item):
            budget, prompt = item
            body = {"model": f"{NAME}:{budget}", "prompt": prompt, "max_tokens": 10, "temperature": 0}
            return http.post("/v1/completions", json=body).json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
        for (budget, prompt), answer in zip(asks, answers):
            assert answer == text_of(generator, solo(generator, prompt, budget, 10)), (budget, prompt)
    assert counters["stats"]["unique_graphs"] == compiled_at_start


def test_serve_tool_refuses_bad_options_at_once():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "serve.py"), "--checkpoint", "anything", "--max-batch", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--max-batch=0" in lines[0], proc.stderr


def test_binding_beyond_loopback_without_a_key_warns():
    from elastic_megatron.serving.options import exposure_warning

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("10.1.2.3", None)


@pytest.mark.slurm
def test_slurm_serve_job_prints_its_endpoint_and_drains_on_term(checkpoint, tmp_path):
    """`sbatch slurm/serve.sh` on the local test cluster (its own header: one task, one GPU):
    the endpoint file and log name node and port, the server answers there, and SIGTERM to
    the batch shell drains it: the job completes with status 0."""
    if os.geteuid() != 0 or not os.path.exists("/etc/debian_version"):
        pytest.skip("needs root on Debian to install and start slurmctld/slurmd")
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster().start()
    try:
        port = str(20000 + os.getpid() % 20000)
        out = cluster.run("sbatch", "--parsable", "--job-name=em-test-serve", "--cpus-per-task=1", "--time=00:10:00",
                          f"--output={tmp_path}/%x-%j.out",
                          f"--export=ALL,ELASTIC_MEGATRON_ROOT={REPO},RUN_ROOT={tmp_path}/runs,OMP_NUM_THREADS=1,SERVE_PORT={port}",
                          str(REPO / "slurm" / "serve.sh"), "--checkpoint", str(checkpoint), "--dtype", "fp32",
                          "--api-key", KEY, "--max-batch", "2", "--host", "127.0.0.1", cwd=tmp_path)  # loopback in tests
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        endpoint = tmp_path / "runs" / job / "endpoint"
        deadline, models = time.time() + 240, None
        while time.time() < deadline and models is None:
            if endpoint.exists():
                try:
                    models = httpx.get(endpoint.read_text().strip().replace(os.uname().nodename, "127.0.0.1") + "/models",
                                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
                except httpx.TransportError:
                    pass
            time.sleep(1)
        log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
        assert models is not None, log[-3000:] + cluster.daemon_logs()
        assert [m["id"] for m in models["data"]][0] == NAME
        assert f"serving on node {os.uname().nodename}, port {port}: http://" in log
        assert cluster.run("scancel", "--signal=TERM", "--batch", job).returncode == 0
        deadline = time.time() + 120
        while time.time() < deadline and cluster.job_state(job) not in ("COMPLETED", "FAILED", "CANCELLED"):
            time.sleep(1)
        log = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
        assert cluster.job_state(job) == "COMPLETED" and "server exited with 0" in log, log[-3000:]
        assert not endpoint.exists()
    finally:
        cluster.stop()


# ---- last: it stops the module's server ------------------------------------------------------------


def test_sigterm_under_load_finishes_the_streams_and_exits_0(server, generator):
    prompts = [f"# stream {i}\n" for i in range(4)]
    expected = [text_of(generator, solo(generator, p, "medium", 300)) for p in prompts]
    started = threading.Barrier(len(prompts) + 1, timeout=60)
    texts = [None] * len(prompts)

    def stream(i):
        with server.http() as http, http.stream("POST", "/v1/completions", json={
                "model": f"{NAME}:medium", "prompt": prompts[i], "max_tokens": 300, "temperature": 0, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: ") and len(lines) == 1:
                    started.wait()  # every stream has its first chunk: now the signal
            texts[i] = sse_texts(lines)[0]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    started.wait()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.proc.stderr.read()[-3000:]
    for t in threads:
        t.join(10)
    assert texts == expected  # every stream in flight finished, whole
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    assert "Shutting down" in server.proc.stderr.read()
