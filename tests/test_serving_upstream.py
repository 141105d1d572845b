"""Budgets served by upstream servers behind the front end (tools/serve.py --upstreams,
serving/frontend.py, serving/upstream.py), with real upstreams: tools/serve.py processes
each serving one budget's slice of a tiny elastic checkpoint (what an engine would serve),
started here on 127.0.0.1 and stopped after; the front end is tools/serve.py over that
checkpoint's own budgets plus the upstreams (local and remote budgets in one server).

Greedy tokens through the front end equal the upstream's own, per budget; budget control
through two upstreams equals budget control over the checkpoint's own budgets token for
token (and the generator's); the openai client works unchanged. Faults: an upstream
answering 500 (a stdlib HTTP server here), one down at start (then started: used again),
one killed mid-stream, one hanging past its timeout (SIGSTOP): each gives one error naming
the upstream (502 / 503 / 504; in a stream an error event, then [DONE]) and the other
budgets answer; a client that disconnects cancels its upstream request (the upstream's
metrics show it stopped generating); another tokenizer is refused by name at start.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from checkpoint_helpers import elastic_meta
from conftest import REPO, preset, serving_in_thread
from elastic_helpers import randomised_model
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
NAME, KEY, UPSTREAM_KEY = "tinyfleet", "front-key", "upstream-key"
HANG_TIMEOUT_S = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def serving_url(proc: subprocess.Popen) -> str:
    """The URL a tools/serve.py process prints once it accepts requests (without /v1)."""
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return line.split()[-1].removesuffix("/v1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str, key: str | None) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}


class Scripted(BaseHTTPRequestHandler):
    """A real HTTP server with scripted answers: GET /v1/models lists one model, POST
    /v1/completions answers `server.completion_status`, POST /tokenize `server.tokens` (404 if None)."""

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": "scripted", "object": "model", "max_model_len": 1024}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/tokenize":
            tokens = self.server.tokens
            self.answer(404, {"detail": "Not Found"}) if tokens is None else self.answer(200, {"tokens": tokens})
        else:
            self.answer(self.server.completion_status, {"error": {"message": "the engine crashed", "type": "server_error"}})


@pytest.fixture(scope="module")
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.completion_status, server.tokens = 500, None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def elastic(dist, tmp_path_factory):
    """(the elastic checkpoint, {budget: its fp32 slice})."""
    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    root = tmp_path_factory.mktemp("fleet")
    store.save_checkpoint(root / NAME, randomised_model(CFG, seed=21), None, None, 3, 0,
                          elastic_meta(CFG, BUDGETS, data={"tokenizer": {"type": "byte"}}))
    return root / NAME, {b: slice_checkpoint(root / NAME, root / b, b, precision="fp32") for b in ("small", "medium")}


@pytest.fixture(scope="module")
def generator(elastic):
    return ElasticGenerator.from_checkpoint(elastic[0])


@pytest.fixture(scope="module")
def fleet(elastic, scripted, tmp_path_factory):
    """The upstreams (small, medium: tools/serve.py over each slice; small wants an API
    key) and the front end (tools/serve.py over the elastic checkpoint + upstream budgets
    rsmall, rmedium, spare (nobody listens there yet), broken (answers 500)). All three start
    together: an upstream not up yet when the front end starts is checked by its first use."""
    checkpoint, slices = elastic
    ports = {"small": free_port(), "medium": free_port()}
    urls = {b: f"http://127.0.0.1:{port}" for b, port in ports.items()}
    procs = {"small": serve("--checkpoint", str(slices["small"]), "--port", str(ports["small"]), "--api-key", UPSTREAM_KEY),
             "medium": serve("--checkpoint", str(slices["medium"]), "--port", str(ports["medium"]))}
    try:
        spare_port = free_port()
        config = tmp_path_factory.mktemp("fleet-config") / "fleet.yaml"
        config.write_text(json.dumps({"upstreams": {  # JSON is YAML
            "rsmall": {"url": urls["small"] + "/v1", "api_key": UPSTREAM_KEY},
            "rmedium": {"url": urls["medium"] + "/v1", "timeout": HANG_TIMEOUT_S},
            "spare": {"url": f"http://127.0.0.1:{spare_port}/v1", "connect_timeout": 2},
            "broken": {"url": f"http://127.0.0.1:{scripted.server_port}/v1"}}}))
        procs["front"] = serve("--checkpoint", str(checkpoint), "--upstreams", str(config), "--port", "0", "--api-key", KEY,
                               "--max-batch", "4", "--max-queue", "8")
        front = serving_url(procs["front"])
        assert [serving_url(procs[b]) for b in ("small", "medium")] == [urls["small"], urls["medium"]]
        yield {"front": front, "urls": urls, "procs": procs, "spare_port": spare_port, "slices": slices}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            stop_server(p, grace_s=20)
    assert procs["front"].returncode == 0  # SIGTERM: the front end drained and exited 0


def front_client(fleet) -> httpx.Client:
    return httpx.Client(base_url=fleet["front"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def tokens_of(body: dict) -> list[int]:
    """The generated token ids of a completion asked with logprobs=0, return_tokens_as_token_ids."""
    return [int(t.removeprefix("token_id:")) for t in body["choices"][0]["logprobs"]["tokens"]]


def stream_lines(client: httpx.Client, path: str, body: dict) -> list[str]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line.startswith("data: ")]


def stream_text(lines: list[str]) -> tuple[str, list[dict]]:
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    return "".join(c["choices"][0].get("text") or "" for c in chunks if c["choices"]), chunks


# ---- the API through the front end -------------------------------------------------------------------


def test_models_health_and_metrics_name_every_upstream(fleet):
    client = front_client(fleet)
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [NAME] + [f"{NAME}:{b}" for b in ("full", "medium", "small", "rsmall", "rmedium", "spare", "broken")]
    health = httpx.get(fleet["front"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"  # spare is down; the rest answer
    states = health.json()["upstreams"]
    assert {b: s["state"] for b, s in states.items()} == {"rsmall": "up", "rmedium": "up", "spare": "down", "broken": "up"}
    assert states["rsmall"]["tokenizer_checked"] and states["broken"]["tokenizer_checked"] is False  # it has no /tokenize
    assert "spare" in states["spare"]["error"] and "cannot connect" in states["spare"]["error"]
    assert client.get("/metrics").status_code == 200 and httpx.get(fleet["front"] + "/metrics").status_code == 401
    m = metrics(fleet["front"], KEY)
    assert m['elastic_megatron_upstream_up{upstream="rsmall"}'] == 1 and m['elastic_megatron_upstream_up{upstream="spare"}'] == 0


def test_greedy_tokens_through_the_front_end_equal_the_upstreams_own(fleet, generator):
    """Per budget, the front end's greedy tokens and log-probs (plain and streamed) are the
    upstream's own, which are the elastic checkpoint's at that budget."""
    client = front_client(fleet)
    for budget, remote in (("small", "rsmall"), ("medium", "rmedium")):
        key = UPSTREAM_KEY if budget == "small" else None
        direct = httpx.post(fleet["urls"][budget] + "/v1/completions", headers={"Authorization": f"Bearer {key}"} if key else {},
                            json={"prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "logprobs": 2,
                                  "return_tokens_as_token_ids": True}, timeout=60).json()
        body = {"model": f"{NAME}:{remote}", "prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "logprobs": 2,
                "return_tokens_as_token_ids": True}
        through = client.post("/v1/completions", json=body).json()
        assert tokens_of(through) == tokens_of(direct), budget
        assert tokens_of(through) == generator.generate_ids([generator.encode("def f(x):")], budget, 12)[0][0], budget
        for ours, theirs in zip(through["choices"][0]["logprobs"]["top_logprobs"], direct["choices"][0]["logprobs"]["top_logprobs"]):
            assert ours.keys() == theirs.keys() and all(abs(ours[k] - theirs[k]) < 1e-6 for k in ours)
        assert through["choices"][0]["text"] == direct["choices"][0]["text"]
        assert through["usage"]["phases"][0]["budget"] == remote
        text, _ = stream_text(stream_lines(client, "/v1/completions", {**body, "logprobs": None}))
        assert text == direct["choices"][0]["text"], budget


def test_budget_control_through_two_upstreams_equals_local_budget_control(fleet, generator):
    """Think at rsmall, answer at rmedium (two upstream processes) gives the tokens of think
    at small, answer at medium over the checkpoint (the front end's own budgets, and the
    generator), at the cap (the delimiter forced) and at a delimiter the trace writes."""
    client = front_client(fleet)
    capped = generator.budget_control("Hello", "small", "medium", "</think>", max_think_tokens=40, max_answer_tokens=10)
    written = next(c for c in capped.texts[0][2:] if c.isascii() and c.isprintable())  # a delimiter the trace writes
    for delimiter, max_think in (("</think>", 6), (written, 40)):
        control = {"max_think_tokens": max_think, "think_delimiter": delimiter, "prompt": "Hello", "max_tokens": 10,
                   "temperature": 0}
        remote = client.post("/v1/completions", json={**control, "think_budget": "rsmall", "answer_budget": "rmedium"}).json()
        local = client.post("/v1/completions", json={**control, "think_budget": "small", "answer_budget": "medium"}).json()
        out = generator.budget_control("Hello", "small", "medium", delimiter, max_think_tokens=max_think, max_answer_tokens=10)
        assert remote["choices"][0]["text"] == local["choices"][0]["text"] == "".join(out.texts), delimiter
        phases = [(p["phase"], p["budget"]) for p in remote["usage"]["phases"]]
        assert phases == [("think", "rsmall"), ("answer", "rmedium")]
        assert remote["usage"]["phases"][1]["completion_tokens"] == len(out.token_ids[1])
        assert remote["usage"]["phases"][1]["prompt_tokens"] == len(generator.encode("Hello")) + len(out.token_ids[0])
        text, _ = stream_text(stream_lines(client, "/v1/completions",
                                           {**control, "think_budget": "rsmall", "answer_budget": "rmedium"}))
        assert text == remote["choices"][0]["text"]
    assert out.texts[0].endswith(written) and len(out.token_ids[0]) < 40  # the second trace ended at the delimiter


def test_the_openai_client_works_unchanged(fleet):
    import openai

    client = openai.OpenAI(base_url=fleet["front"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert f"{NAME}:rmedium" in [m.id for m in client.models.list().data]
    plain = client.completions.create(model=f"{NAME}:rsmall", prompt="abc", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=f"{NAME}:rsmall", prompt="abc", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text and plain.usage.completion_tokens == 6
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                          extra_body={"think_budget": "rsmall", "answer_budget": "rmedium", "max_think_tokens": 4})
    assert [p["budget"] for p in chat.usage.model_extra["phases"]] == ["rsmall", "rmedium"]
    with pytest.raises(openai.BadRequestError, match="budget control between a budget run here"):
        client.completions.create(model=NAME, prompt="a", max_tokens=2, extra_body={"think_budget": "small", "answer_budget": "rmedium"})


# ---- faults ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_upstream_faults_name_the_upstream_and_the_other_budgets_answer(fleet):
    client = front_client(fleet)

    def others_answer():
        for model in (f"{NAME}:small", f"{NAME}:rsmall"):
            r = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200, (model, r.text)

    # an error answer: 502 naming it; in a stream, an error event, then [DONE]
    r = client.post("/v1/completions", json={"model": f"{NAME}:broken", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 502 and "upstream 'broken'" in r.json()["error"]["message"] and "500" in r.json()["error"]["message"]
    lines = stream_lines(client, "/v1/chat/completions", {"model": f"{NAME}:broken", "messages": [{"role": "user", "content": "x"}]})
    assert lines[-1] == "data: [DONE]" and "upstream 'broken'" in json.loads(lines[-2][6:])["error"]["message"]
    others_answer()

    # down at start: 503 naming it; started now, it is used again
    r = client.post("/v1/completions", json={"model": f"{NAME}:spare", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 503 and "upstream 'spare'" in r.json()["error"]["message"]
    spare = serve("--checkpoint", str(fleet["slices"]["small"]), "--port", str(fleet["spare_port"]))
    fleet["procs"]["spare"] = spare
    serving_url(spare)
    r = client.post("/v1/completions", json={"model": f"{NAME}:spare", "prompt": "x", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == client.post("/v1/completions", json={
        "model": f"{NAME}:rsmall", "prompt": "x", "max_tokens": 3, "temperature": 0}).json()["choices"][0]["text"]
    assert httpx.get(fleet["front"] + "/health").json()["upstreams"]["spare"]["state"] == "up"

    # killed mid-stream: the stream ends with an error event naming it, then [DONE]
    with client.stream("POST", "/v1/completions", json={"model": f"{NAME}:spare", "prompt": "x", "max_tokens": 900,
                                                        "stream": True}) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 3:
                    spare.kill()
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2][6:])["error"]
    assert error["message"].startswith("upstream 'spare'") and error["type"] == "server_error", error
    assert len(lines) < 900
    others_answer()

    # hanging past its timeout (stopped): 504 naming it, the others answer meanwhile; continued, it answers again
    medium = fleet["procs"]["medium"]
    os.kill(medium.pid, signal.SIGSTOP)
    try:
        r = client.post("/v1/completions", json={"model": f"{NAME}:rmedium", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 504 and "upstream 'rmedium'" in r.json()["error"]["message"]
        assert f"{HANG_TIMEOUT_S} s" in r.json()["error"]["message"]
        others_answer()
    finally:
        os.kill(medium.pid, signal.SIGCONT)
    r = client.post("/v1/completions", json={"model": f"{NAME}:rmedium", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200, r.text
    m = metrics(fleet["front"], KEY)
    assert m['elastic_megatron_upstream_errors_total{status="504",upstream="rmedium"}'] >= 1
    assert m['elastic_megatron_upstream_errors_total{status="502",upstream="broken"}'] >= 2


def test_a_client_that_disconnects_cancels_its_upstream_request(fleet):
    """A stream through the front end closed after two chunks: the upstream's sequence
    leaves its batch (its metrics: nothing running, far fewer tokens than asked)."""
    url = fleet["urls"]["medium"]
    before = metrics(url, None)['elastic_megatron_generated_tokens_total{budget="full"}']
    client = front_client(fleet)
    with client.stream("POST", "/v1/completions", json={"model": f"{NAME}:rmedium", "prompt": "x", "max_tokens": 1000,
                                                        "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    deadline = time.monotonic() + 30
    while metrics(url, None)['elastic_megatron_running_sequences{budget="full"}'] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = metrics(url, None)
    assert after['elastic_megatron_running_sequences{budget="full"}'] == 0
    assert after['elastic_megatron_generated_tokens_total{budget="full"}'] - before < 1000


def test_beyond_the_queue_bound_upstream_requests_get_429(fleet):
    """16 requests at once for one upstream budget: 4 in flight + 8 waiting may be held
    (--max-batch, --max-queue of the front end), the rest get 429 with Retry-After."""
    async def burst():
        async with httpx.AsyncClient(base_url=fleet["front"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "model": f"{NAME}:rmedium", "prompt": "q", "max_tokens": 300, "temperature": 0}) for _ in range(16)))

    results = asyncio.run(burst())
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 12 and 429 in codes, codes
    refused = [r for r in results if r.status_code == 429]
    assert all(r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    assert len({r.json()["choices"][0]["text"] for r in results if r.status_code == 200}) == 1
    again = asyncio.run(burst())  # every place came back
    assert [r.status_code for r in again].count(200) >= 12


# ---- start-up: the front end alone, another tokenizer, bad options ---------------------------------------


def test_a_front_end_without_a_checkpoint_and_another_tokenizer_refused(fleet, scripted):
    """In this process: a front end of upstreams only (the tokenizer from a slice's
    directory) serves their greedy tokens; an upstream whose /tokenize gives other ids is
    refused by name before anything is served."""
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.serving.fleet import fleet_config
    from elastic_megatron.serving.frontend import FrontEnd, front_end_tokenizer
    from elastic_megatron.serving.options import ServeOptions

    tokenizer = front_end_tokenizer(str(fleet["slices"]["medium"]))
    options = ServeOptions(max_batch=2, max_queue=2)
    server = FrontEnd(fleet_config([f"medium={fleet['urls']['medium']}/v1"]), "alone", options, tokenizer=tokenizer)
    with serving_in_thread(server) as url:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["alone", "alone:medium"]
        body = {"prompt": "def", "max_tokens": 8, "temperature": 0}
        through = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert through == httpx.post(fleet["urls"]["medium"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        r = httpx.post(url + "/v1/completions", json={**body, "think_budget": "medium", "answer_budget": "medium"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "think_budget"  # one budget: nothing to control

    scripted.tokens = [1, 2, 3]
    try:
        with pytest.raises(ConfigError, match="upstream 'other'.*another tokenizer"):
            FrontEnd(fleet_config([f"other=http://127.0.0.1:{scripted.server_port}/v1"]), "x", options, tokenizer=tokenizer)
    finally:
        scripted.tokens = None


def test_the_upstreams_file_and_model_ids_are_checked(tmp_path, monkeypatch):
    """The --upstreams file: each bad entry is refused naming its key; an upstream listing
    several models needs the one named."""
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.serving.fleet import fleet_config
    from elastic_megatron.serving.upstream import Upstream, UpstreamError

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    for upstreams, says in (({"a": {"url": "http://h:1/v1", "tiemout": 3}}, "upstreams.a.tiemout"),
                            ({"a": {"url": "http://h:1/v1", "timeout": -1}}, "upstreams.a.timeout"),
                            ({"a": {"url": "http://h:1/v1", "api_key_env": "NO_SUCH_KEY"}}, "is not set"),
                            ({"a b": "http://h:1/v1"}, "a budget name is"),
                            ({"a": {"model": "m"}}, "must be an http")):
        config = tmp_path / "fleet.yaml"
        config.write_text(json.dumps({"upstreams": upstreams}))
        with pytest.raises(ConfigError, match=says):
            fleet_config([], str(config))
    config.write_text(json.dumps({"max_model_len": 512, "upstreams": {"a": "http://h:1/v1", "b": {
        "url": "http://h:2/v1/", "model": "m", "prompt_ids": False}}}))
    fleet = fleet_config(["c=http://h:3/v1"], str(config))
    assert [(u.budget, u.url, u.model, u.prompt_ids) for u in fleet.upstreams] == [
        ("a", "http://h:1/v1", None, True), ("b", "http://h:2/v1", "m", False), ("c", "http://h:3/v1", None, True)]
    assert fleet.max_model_len == 512 and fleet.upstreams[1].root == "http://h:2"
    several = [{"id": "x", "root": "x"}, {"id": "y", "root": "y"}]
    with pytest.raises(UpstreamError, match="serves \\['x', 'y'\\]: name the one"):
        Upstream(fleet.upstreams[0], None)._pick_model(several)
    assert Upstream(fleet.upstreams[1], None)._pick_model([*several, {"id": "m", "root": "m"}])[0] == "m"


@pytest.mark.parametrize("args, message", [
    (["--upstream", "small"], "must be NAME=URL"),
    (["--upstream", "small=ftp://x"], "must be an http(s) URL"),
    (["--upstream", "a=http://h:1/v1", "--upstream", "a=http://h:2/v1"], "names a budget twice"),
    (["--upstream", "a=http://127.0.0.1:9/v1"], "--model-name"),
])
def test_bad_upstream_options_are_one_line_exit_2(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "serve.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_task_scores_through_the_front_end_endpoint(fleet, tmp_path):
    """tools/evaluate_tasks.py --endpoint: lm-eval through the front end scores an upstream
    budget (log-likelihoods from its echoed prompt log-probs) as the same budget run here."""
    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.jobs.tasks import TaskRequest, check_request, run_tasks

    result = run_tasks(TaskRequest(None, ["stdlib_cloze"], str(tmp_path / "out"), budgets=["rsmall", "small"], limit=6,
                                   batch_size=2, endpoint=fleet["front"] + "/v1", api_key=KEY))
    main = {s.budget: s for s in result.scores if s.metric == "acc" and s.model == "endpoint"}
    assert set(main) == {"rsmall", "small"} and main["rsmall"].samples == 6
    assert main["rsmall"].value == main["small"].value
    assert "| endpoint | as served | rsmall | n/a |" in (tmp_path / "out" / "results.md").read_text()
    for change, says in (({"budgets": ["nope"]}, "the endpoint serves"), ({"api_key": None}, "401"),
                         ({"endpoint": "http://127.0.0.1:9/v1"}, "GET /v1/models failed"),
                         ({"sorted": "runs/x"}, "not with --endpoint")):
        with pytest.raises(ConfigError, match=says):  # before any task is read or evaluated
            check_request(TaskRequest(None, ["stdlib_cloze"], str(tmp_path / "bad"), **{
                "endpoint": fleet["front"] + "/v1", "api_key": KEY, **change}))
    assert not (tmp_path / "bad").exists()


# ---- the Slurm job ---------------------------------------------------------------------------------------


def test_serve_fleet_dry_run_prints_every_command_and_refuses_bad_budgets(tmp_path):
    """slurm/serve_fleet.sh --dry-run: an engine per budget on its own GPUs (first fit over
    the nodes), its health check, the front end's upstreams file and command; bad budgets
    are one line, exit 2, before anything starts."""
    for b in ("small", "full"):
        (tmp_path / b).mkdir()
    script = str(REPO / "slurm" / "serve_fleet.sh")

    def run(*args, **env):
        return subprocess.run(["bash", script, "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    out = run("--budget", f"small={tmp_path}/small:2", "--budget", f"full={tmp_path}/full:8", "--budget", f"mid={tmp_path}/small:4",
              "--engine", "sglang", "--", "--api-key", "K", SLURM_NNODES="2", SERVE_PORT="30000")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    engines = [line for line in lines if line.startswith("engine ")]
    assert [e.split(":")[0] for e in engines] == ["engine small (tp 2) on n1", "engine full (tp 8) on n2", "engine mid (tp 4) on n1"]
    assert "--nodelist=n2 --gres=gpu:8" in engines[1] and "sglang.launch_server" in engines[1] and "--tp 8" in engines[1]
    assert "--port 30002" in engines[1] and "curl -sf http://n2:30002/health" in out.stdout
    assert "    url: http://n1:30003/v1" in out.stdout and "      model: mid" in out.stdout
    front = next(line for line in lines if line.startswith("front end on n1: "))
    assert "tools/serve.py --upstreams" in front and front.endswith("--port 30000 --api-key K")
    template = run("--budget", f"small={tmp_path}/small:1", "--engine-command", "my-engine {model} -p {port} -n {name}")
    assert f"my-engine {tmp_path}/small -p 20001 -n small" in template.stdout

    for args, message in ((["--budget", f"small={tmp_path}/nope:1"], "does not exist"),
                          (["--budget", f"small={tmp_path}/small:9"], "exceeds the 8 GPUs"),
                          (["--budget", f"a={tmp_path}/small:4", "--budget", f"b={tmp_path}/full:8"], "no node has 8 GPUs left"),
                          (["--budget", f"a={tmp_path}/small:1", "--budget", f"a={tmp_path}/full:1"], "given twice"),
                          (["--budget", f"small={tmp_path}/small"], "must be NAME=PATH:TP"),
                          (["--engine", "tgi", "--budget", f"small={tmp_path}/small:1"], "allowed: vllm, sglang"),
                          ([], "no budget")):
        bad = run(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout
