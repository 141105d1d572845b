"""Downstream task scores of every budget x precision of one checkpoint, with
lm-evaluation-harness, through the project's OpenAI-compatible server.

Why through the server (tools/serve.py) and lm-eval's `local-completions` model, not an
in-process lm-eval model class: it is the one code path for serving and evaluation, so the
scores are those of the model users are served (budgets as views of one copy of the weights,
continuous batching, the same tokenizer and stop handling); a budget is selected by the model
id `<name>:<budget>` and budget control by the request's extra body fields (`think_budget`,
`answer_budget`, `max_think_tokens`, `think_delimiter`), so nothing lm-eval-specific exists
in the project; and it is how NVIDIA's own evaluation (NeMo Evaluator, NeMo-Skills) and any
OpenAI client reach a model, so the same server answers them too. Log-likelihood tasks are
scored with `echo=true, logprobs` (the server returns the prompt's own log-probs), text is
generated greedily; lm-eval tokenizes through the server's /tokenize (its `remote` tokenizer
backend), so no tokenizer is fetched from a hub.

    run_tasks(TaskRequest(checkpoint="runs/demo-stage2", tasks=["stdlib_cloze"], out="runs/demo-tasks"))

Order of work: every input is checked first (tasks known and their data readable offline,
budgets, precisions, baselines, output directory), then one server per (model, precision)
is started on 127.0.0.1 at a free port, every budget x task is evaluated through it, and
results.json, results.md and results.png are written together at the end (nothing is
written when anything fails), then logged to the checkpoint run's W&B when it used W&B.

Offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before lm-eval
and datasets are imported; the shipped tasks read their JSON-lines files through
eval_tasks/loader.py; their metrics (acc, acc_norm, exact_match) are lm-eval's own code, not
the `evaluate` hub. An lm-eval task whose data are not in the local datasets cache is refused
by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from elastic_megatron.config.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PRECISIONS = ("bf16", "fp8", "nvfp4")
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SERVING_LINE = re.compile(r"^serving (\S+) on (http://\S+)/v1\s*$", re.M)
SEED = 1234  # lm-eval's default seeds (simple_evaluate: numpy, torch, few-shot sampler)


@dataclass
class TaskRequest:
    checkpoint: str
    tasks: list[str]
    out: str
    budgets: Optional[list[str]] = None  # None: all
    precisions: list[str] = field(default_factory=lambda: ["bf16"])
    include_paths: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    qad: Optional[str] = None
    sorted: Optional[str] = None  # a sorted parent: the untrained slices at the same budgets (bf16)
    batch_size: int = 8
    dtype: str = "fp32"
    server_timeout: float = 600.0
    log_samples: bool = False
    wandb: bool = True
    endpoint: Optional[str] = None  # an OpenAI endpoint to evaluate as it serves (no checkpoint, no server started)
    api_key: Optional[str] = None  # the endpoint's


@dataclass
class Score:
    task: str
    budget: str
    precision: str
    model: str  # elastic | sorted | model
    metric: str
    filter: str
    value: float
    stderr: Optional[float]
    samples: int
    seconds: float
    total_params: int = 0
    active_params: int = 0


@dataclass
class Served:
    """One server to start: what it serves and how (the tools/serve.py command line)."""

    model: str  # row label: elastic | sorted | model
    precision: str  # column label: bf16 | fp8 PTQ | nvfp4 PTQ | nvfp4 QAD | the export's format
    argv: list[str]
    model_name: str
    budgets: list[str]  # budgets to evaluate; model ids <model_name>:<budget> (or the bare name)
    elastic: bool
    ids: dict[str, str] = field(default_factory=dict)  # an endpoint's: budget -> its model id
    url: Optional[str] = None  # an endpoint's base URL: evaluated as it is, nothing started

    def model_id(self, budget: str) -> str:
        if budget in self.ids:
            return self.ids[budget]
        return f"{self.model_name}:{budget}" if self.elastic else self.model_name


# ---- tasks -----------------------------------------------------------------------------------


def go_offline() -> None:
    """Before lm-eval, datasets or transformers are imported: no hub, no download."""
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for module, names in (("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
                          ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        if module in sys.modules:  # imported before us (tests): their flags were read at import
            for name in names:
                setattr(sys.modules[module], name, True)


class _Quiet(logging.Filter):
    """lm-eval's warnings that say nothing here: every shipped task has its own loader, and
    the server batches prompts of any lengths."""

    NOISE = ("Custom kwargs can be passed", "Batch size > 1 detected")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def task_manager(include_paths: list[str], defaults: bool = False):
    """lm-eval's TaskManager over the shipped tasks, `include_paths` and (`defaults`) lm-eval's
    own task library (indexing it takes seconds to half a minute)."""
    go_offline()
    from lm_eval.tasks import TaskManager

    from elastic_megatron.eval_tasks import TASKS_DIR

    for name in ("lm_eval.api.task", "lm_eval.models.api_models"):
        if not any(isinstance(f, _Quiet) for f in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(_Quiet())
    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=defaults)


def list_tasks(include_paths: list[str]) -> list[str]:
    """The shipped tasks, then those of the include paths, one name each."""
    from elastic_megatron.eval_tasks import shipped_tasks

    check_include_paths(include_paths)
    shipped = shipped_tasks()
    extra = [t for t in task_manager(include_paths).all_subtasks if t not in shipped] if include_paths else []
    return shipped + sorted(extra)


def check_include_paths(include_paths: list[str]) -> None:
    for p in include_paths:
        if not Path(p).is_dir():
            raise ConfigError("--include-path", p, "is not a directory (give a directory of lm-eval task YAMLs)")


def resolve_tasks(names: list[str], include_paths: list[str]):
    """The TaskManager that knows every name in `names`, after loading each task once (its
    data read, offline); a ConfigError names an unknown task (listing the known ones) or a
    task whose data are not available."""
    from elastic_megatron.eval_tasks import shipped_tasks

    if not names:
        raise ConfigError("--tasks", "", f"give at least one task; shipped: {shipped_tasks()}")
    check_include_paths(include_paths)
    manager = task_manager(include_paths)
    local = set(manager.all_tasks)

    def unknown(n: str) -> ConfigError:
        extra = sorted(local - set(shipped_tasks()))
        return ConfigError("--tasks", n, f"is not a task; shipped: {shipped_tasks()}"
                           + (f", in --include-path: {extra}" if extra else "") + ", or one of lm-eval's own (lm-eval ls tasks)")

    missing = [n for n in names if n not in local]
    for n in _not_in_lm_eval_library(missing):
        raise unknown(n)
    if missing:
        print("indexing lm-eval's own tasks for " + ", ".join(missing) + " ...", file=sys.stderr, flush=True)
        manager = task_manager(include_paths, defaults=True)
        for n in missing:
            if n not in manager.all_tasks:
                raise unknown(n)
    for n in names:
        try:
            loaded = manager.load([n])
            for task in loaded["tasks"].values():
                next(iter(task.eval_docs), None)
        except ConfigError:
            raise
        except Exception as err:  # whatever lm-eval or datasets raise for data they cannot read offline
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError("--tasks", n, f"its data are not available offline ({type(err).__name__}: {first})") from err
    return manager


def _not_in_lm_eval_library(names: list[str]) -> list[str]:
    """Those of `names` no file of lm-eval's task library mentions, in order (a byte search
    over the library read once, ~10x faster than indexing it, which is only worth it when
    every name is mentioned)."""
    if not names:
        return []
    import lm_eval.tasks

    unseen = {n: n.encode() for n in names}
    root = Path(lm_eval.tasks.__file__).parent
    for p in root.rglob("*"):
        if p.suffix in (".yaml", ".py"):
            text = p.read_bytes()
            for n in [n for n, needle in unseen.items() if needle in text]:
                del unseen[n]
            if not unseen:
                break
    return [n for n in names if n in unseen]


# ---- what to serve ---------------------------------------------------------------------------


def plan_servers(req: TaskRequest) -> tuple[list[Served], dict[str, tuple[int, int]]]:
    """One server per (model, precision), each input checked; nothing started. Also each
    budget's (total, active) parameters."""
    from elastic_megatron.checkpoint.metadata import require_same_architecture
    from elastic_megatron.inference.loading import HF, open_for_inference
    from elastic_megatron.jobs.evaluate import checkpoint_rows, row_params

    bad = [p for p in req.precisions if p not in PRECISIONS]
    if bad or not req.precisions:
        raise ConfigError("--precisions", ",".join(req.precisions), f"allowed: {list(PRECISIONS)} (comma-separated)")
    opened = open_for_inference(req.checkpoint)
    rows = checkpoint_rows(req.checkpoint, req.budgets, key="--budgets")
    elastic = any(w is not None for _, w in rows)
    budgets = [name for name, _ in rows]
    own = opened.quantization["format"] if (opened.format == HF and opened.quantization) else "bf16"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(req.checkpoint).resolve().name) or "model"
    base = _serve_argv(req.checkpoint, req.dtype)
    out = []
    for p in req.precisions:
        if p == own:
            out.append(Served("elastic" if elastic else "model", p, base, name, budgets, elastic))
        elif own != "bf16":
            raise ConfigError("--precisions", p, f"{req.checkpoint} is a {own} export and is served as it is: "
                                                 f"--precisions {own}")
        elif not elastic:
            raise ConfigError("--precisions", p, f"{req.checkpoint} is one BF16 model; evaluate a {p} export of it "
                                                 f"(tools/zero_shot_slicing.py --precision {p} --format hf)")
        else:
            out.append(_quantized(req, opened.cfg, p, name, budgets))
    if req.qad and "nvfp4" not in req.precisions and "fp8" not in req.precisions:
        raise ConfigError("--qad", req.qad, "applies to --precisions fp8/nvfp4 (the QAD checkpoint's format)")
    if req.sorted:
        if not elastic:
            raise ConfigError("--sorted", req.sorted, f"baselines are served at an elastic checkpoint's budgets; "
                                                      f"{req.checkpoint} is not elastic")
        require_same_architecture(opened.cfg, req.sorted, "--sorted")
        argv = _serve_argv(req.sorted, req.dtype) + ["--budgets-from", str(req.checkpoint)]
        out.append(Served("sorted", "bf16", argv, f"{name}-sorted", budgets, True))
    return out, {budget: row_params(opened.cfg, widths) for budget, widths in rows}


def _serve_argv(checkpoint: str, dtype: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "serve.py"), "--checkpoint", str(checkpoint), "--dtype", dtype]


def _quantized(req: TaskRequest, cfg, precision: str, name: str, budgets: list[str]) -> Served:
    """The server of fake-quantized budgets (`cfg`: the checkpoint's model): PTQ of the
    checkpoint, or the QAD checkpoint (its own scales) for the QAD run's format."""
    from elastic_megatron.checkpoint.metadata import require_same_architecture

    source, label = req.checkpoint, f"{precision} PTQ"
    if req.qad:
        record = require_same_architecture(cfg, req.qad, "--qad").get("quantization")
        if not record:
            raise ConfigError("--qad", req.qad, "has no quantization scales: give the run dir of a QAD run (recipes/qad.yaml)")
        if record["format"] == precision:
            source, label = req.qad, f"{precision} QAD"
    return Served("elastic", label, _serve_argv(source, req.dtype) + ["--precision", precision], name, budgets, True)


# ---- the server ------------------------------------------------------------------------------


@contextmanager
def running_server(served: Served, log_path: Path, max_batch: int, timeout: float) -> Iterator[str]:
    """Start `served` on 127.0.0.1 at a free port; yields its base URL (http://host:port) once
    it accepts requests; SIGTERM (then kill) on the way out. Its output goes to `log_path`."""
    argv = served.argv + ["--host", "127.0.0.1", "--port", "0", "--model-name", served.model_name,
                          "--max-batch", str(max_batch)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        begin = time.monotonic()
        while True:
            found = SERVING_LINE.search(log_path.read_text(errors="replace"))
            if found:
                break
            if proc.poll() is not None or time.monotonic() - begin > timeout:
                lines = log_path.read_text(errors="replace").strip().splitlines()
                refused = [x for x in lines if x.startswith("error: ")]
                if proc.returncode == 2 and refused:  # its bad-input path: one line saying what is wrong
                    raise ConfigError("--checkpoint", served.argv[served.argv.index("--checkpoint") + 1],
                                      f"the server refused to serve it: {refused[-1][len('error: '):]}")
                why = f"exited with status {proc.returncode}" if proc.poll() is not None else f"did not start in {timeout:.0f} s"
                raise RuntimeError(f"the server for {served.model} {served.precision} ({' '.join(argv[1:4])}) {why}:\n"
                                   + "\n".join(lines[-8:]))
            time.sleep(0.2)
        yield found.group(2)
    finally:
        stop_server(proc, grace_s=60)


def stop_server(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop a `tools/serve.py` process: SIGTERM (it drains the requests in flight), then kill
    after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_models(url: str, api_key: Optional[str] = None) -> dict[str, int]:
    """model id -> max_model_len, from GET /v1/models."""
    return {m["id"]: int(m["max_model_len"]) for m in model_cards(url, api_key)}


def model_cards(url: str, api_key: Optional[str] = None) -> list[dict]:
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{url}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def endpoint_served(req: TaskRequest) -> Served:
    """What an endpoint serves, as it lists it: budgets `<name>:<budget>` of an elastic
    server (tools/serve.py, its front end over engines), else each model id as it is."""
    import requests

    url = req.endpoint.rstrip("/").removesuffix("/v1")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError("--endpoint", req.endpoint, "must be the http(s) URL of an OpenAI-compatible server, e.g. "
                                                      "http://node1:8000/v1")
    for key, value, default in (("--checkpoint", req.checkpoint, None), ("--precisions", req.precisions, ["bf16"]),
                                ("--qad", req.qad, None), ("--sorted", req.sorted, None)):
        if value not in (default, "", None):
            raise ConfigError(key, value, "not with --endpoint: the endpoint is evaluated as it serves")
    try:
        cards = model_cards(url, req.api_key)
    except (requests.RequestException, ValueError, KeyError) as err:
        raise ConfigError("--endpoint", req.endpoint, f"GET /v1/models failed ({type(err).__name__}: {err}); give the "
                                                      "URL of a running OpenAI-compatible server (and --api-key)") from None
    budgets = {m["budget"]: m["id"] for m in cards if m.get("budget") and m["id"] == f"{m.get('root')}:{m['budget']}"}
    ids = budgets or {m["id"]: m["id"] for m in cards}
    chosen = list(ids) if req.budgets is None else req.budgets
    unknown = [b for b in chosen if b not in ids]
    if unknown or not chosen:
        raise ConfigError("--budgets", ",".join(unknown), f"the endpoint serves {list(ids)}")
    for b in chosen:
        if not next(m for m in cards if m["id"] == ids[b]).get("max_model_len"):
            raise ConfigError("--endpoint", req.endpoint, f"lists no max_model_len for {ids[b]!r} (the length lm-eval "
                                                          "truncates prompts to; vLLM and tools/serve.py list it)")
    name = next((m.get("root") for m in cards if m.get("budget")), None) or "endpoint"
    return Served("endpoint", "as served", [], name, chosen, bool(budgets), {b: ids[b] for b in chosen}, url)


# ---- evaluation --------------------------------------------------------------------------------


def evaluate_model_id(url: str, model_id: str, max_length: int, manager, task: str, limit: Optional[int],
                      batch_size: int, gen_kwargs: Optional[dict] = None, doc_ids: Optional[list[int]] = None,
                      tokenize: bool = True, api_key: Optional[str] = None) -> tuple[dict, float]:
    """lm-eval on one task through the server for one model id: (lm-eval's results, seconds).
    `gen_kwargs` update a generate_until task's generation settings (what is not lm-eval's
    own, e.g. the budget-control fields, goes into the request body as it is); `doc_ids`
    evaluates those documents instead of the first `limit`; `tokenize` False sends generation
    prompts as text (no /tokenize round trips: only the requests themselves are timed);
    `api_key`: the server's, for requests and its /tokenize.

    This is what lm_eval.simple_evaluate does for a `local-completions` model (seeds, zero-shot
    default, few-shot seed, the model from its arguments, lm_eval.evaluator.evaluate), without
    the environment report it adds (torch.utils.collect_env runs pip and nvidia-smi: ~7 s a
    call on a busy CPU machine, once per budget x task)."""
    import random

    import numpy as np
    import torch
    from lm_eval.api.registry import get_model
    from lm_eval.evaluator import evaluate

    lm = get_model("local-completions").create_from_arg_obj(
        {"model": model_id, "base_url": f"{url}/v1/completions", "tokenizer_backend": "remote" if tokenize else None,
         "tokenized_requests": tokenize, "max_length": max_length, "num_concurrent": 1, "max_retries": 1, "seed": SEED,
         **({"header": {"Authorization": f"Bearer {api_key}"}, "auth_token": api_key} if api_key else {})},
        {"batch_size": batch_size})
    loaded = manager.load([task])
    for t in loaded["tasks"].values():
        if gen_kwargs and t.get_config("output_type") == "generate_until":
            t.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        if t.get_config("num_fewshot") is None:
            t.set_config(key="num_fewshot", value=0)
        t.set_fewshot_seed(seed=SEED)
    random.seed(0)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    begin = time.perf_counter()
    samples = {name: list(doc_ids) for name in loaded["tasks"]} if doc_ids is not None else None
    results = evaluate(lm=lm, task_dict=loaded, limit=None if samples else limit, samples=samples, bootstrap_iters=1000,
                       log_samples=True)
    return results, time.perf_counter() - begin


def scores_of(results: dict, served: Served, budget: str, seconds: float, params: tuple[int, int]) -> list[Score]:
    """One Score per (task, metric, filter) lm-eval reports."""
    out = []
    for task, metrics in results["results"].items():
        n = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            out.append(Score(task, budget, served.precision, served.model, metric, filt, float(value),
                             float(stderr) if isinstance(stderr, (int, float)) else None, n, seconds, *params))
    return out


@dataclass
class TaskResults:
    scores: list[Score]
    samples: dict = field(default_factory=dict)  # (model, precision, budget, task) -> lm-eval's logged samples
    paths: dict = field(default_factory=dict)  # json, md, png
    wandb_run: Optional[str] = None


def check_request(req: TaskRequest):
    """Every check of a request, nothing started: (the TaskManager, the servers to start,
    each budget's (total, active) parameters)."""
    from elastic_megatron.config.errors import require_positive_int

    if req.limit is not None:
        require_positive_int("--limit", req.limit)
    require_positive_int("--batch-size", req.batch_size)
    if req.dtype not in ("fp32", "bf16"):
        raise ConfigError("--dtype", req.dtype, "allowed: ['fp32', 'bf16']")
    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", req.out, "is a file; give a directory for results.json, results.md and results.png")
    if req.endpoint:
        served = endpoint_served(req)
        return resolve_tasks(req.tasks, req.include_paths), [served], {b: (0, 0) for b in served.budgets}
    plan, params = plan_servers(req)
    return resolve_tasks(req.tasks, req.include_paths), plan, params


def run_tasks(req: TaskRequest) -> TaskResults:
    """Check everything, evaluate every (model, precision) x budget x task through the server,
    write the outputs, log them to W&B; the results."""
    manager, plan, params = check_request(req)
    result = TaskResults([])
    with tempfile.TemporaryDirectory(prefix="tasks-") as tmp:
        for served in plan:
            log = Path(tmp) / f"server-{served.model}-{served.precision.replace(' ', '_')}.log"
            server = nullcontext(served.url) if served.url else running_server(served, log, req.batch_size,
                                                                                 req.server_timeout)
            with server as url:
                lengths = {m["id"]: m.get("max_model_len") for m in model_cards(url, req.api_key)}
                for budget in served.budgets:
                    model_id = served.model_id(budget)
                    for task in req.tasks:
                        print(f"{served.model} {served.precision} {budget}: {task} ...", file=sys.stderr, flush=True)
                        results, seconds = evaluate_model_id(url, model_id, int(lengths[model_id]), manager, task,
                                                             req.limit, req.batch_size, api_key=req.api_key)
                        result.scores += scores_of(results, served, budget, seconds, params[budget])
                        for name, samples in results.get("samples", {}).items():
                            result.samples[(served.model, served.precision, budget, name)] = samples
    result.paths = write_outputs(result, req)
    if req.wandb and not req.endpoint:
        result.wandb_run = log_to_wandb(req.checkpoint, result.paths, result.scores)
    return result


# ---- outputs ---------------------------------------------------------------------------------


def main_scores(scores: list[Score]) -> list[Score]:
    """Each task's headline number: its first metric on its first filter, as lm-eval lists them."""
    first: dict[str, tuple[str, str]] = {}
    for s in scores:
        first.setdefault(s.task, (s.metric, s.filter))
    return [s for s in scores if (s.metric, s.filter) == first[s.task]]


def render_table(scores: list[Score]) -> str:
    """Markdown: one row per (model, precision, budget), one column per task (headline metric)."""
    main = main_scores(scores)
    tasks = list(dict.fromkeys(s.task for s in main))
    metric = {s.task: s.metric for s in main}
    cell = {(s.model, s.precision, s.budget, s.task): s for s in main}
    rows = list(dict.fromkeys((s.model, s.precision, s.budget) for s in main))
    head = ["model", "precision", "budget", "active params"] + [f"{t} ({metric[t]})" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, precision, budget in rows:
        any_score = next(s for s in main if (s.model, s.precision, s.budget) == (model, precision, budget))
        vals = []
        for t in tasks:
            s = cell.get((model, precision, budget, t))
            vals.append("" if s is None else f"{s.value:.3f}" + (f" ± {s.stderr:.3f}" if s.stderr is not None else ""))
        params = f"{any_score.active_params:,}" if any_score.active_params else "n/a"  # an endpoint's: not known here
        lines.append("| " + " | ".join([model, precision, budget, params] + vals) + " |")
    n = {s.task: s.samples for s in main}
    lines.append("")
    lines.append("documents per task: " + ", ".join(f"{t} {n[t]}" for t in tasks) + " (± is lm-eval's standard error)")
    return "\n".join(lines)


def draw_figure(scores: list[Score], path: Path) -> None:
    """One panel per task: the headline metric per budget, one bar per (model, precision)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elastic_megatron.eval_tasks import CHANCE

    main = main_scores(scores)
    tasks = list(dict.fromkeys(s.task for s in main))
    series = list(dict.fromkeys((s.model, s.precision) for s in main))
    budgets = list(dict.fromkeys(s.budget for s in main))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks) + 1, 3.6), squeeze=False)
    width = 0.8 / len(series)
    for ax, task in zip(axes[0], tasks):
        for j, (model, precision) in enumerate(series):
            xs, ys, errs = [], [], []
            for i, b in enumerate(budgets):
                s = next((s for s in main if (s.task, s.model, s.precision, s.budget) == (task, model, precision, b)), None)
                if s is not None:
                    xs.append(i + j * width)
                    ys.append(s.value)
                    errs.append(s.stderr or 0.0)
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{model} {precision}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))], budgets)
        ax.set_title(task, fontsize=9)
        ax.set_ylabel(next(s.metric for s in main if s.task == task))
        if task in CHANCE:
            ax.axhline(CHANCE[task], color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("downstream tasks per budget and precision", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: TaskResults, req: TaskRequest) -> dict[str, Path]:
    """results.json, results.md, results.png (and samples/*.jsonl with log_samples), each
    written to a temporary name and renamed into place."""
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": req.checkpoint or None, "endpoint": req.endpoint, "sorted": req.sorted, "qad": req.qad, "limit": req.limit,
               "tasks": req.tasks, "scores": [asdict(s) for s in result.scores]}
    staged = {}
    try:
        for name, write in (("json", lambda p: p.write_text(json.dumps(payload, indent=1))),
                            ("md", lambda p: p.write_text(render_table(result.scores) + "\n")),
                            ("png", lambda p: draw_figure(result.scores, p))):
            staged[name] = out / f".results-staged.{name}"
            write(staged[name])
        if req.log_samples:
            samples = out / "samples"
            samples.mkdir(exist_ok=True)
            for (model, precision, budget, task), rows in result.samples.items():
                path = samples / f"{model}_{precision.replace(' ', '_')}_{budget}_{task}.jsonl"
                path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        paths = {}
        for name, tmp in staged.items():
            paths[name] = out / f"results.{name}"
            tmp.replace(paths[name])
        return paths
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def log_to_wandb(checkpoint, paths: dict[str, Path], scores: list[Score]) -> Optional[str]:
    """Log the table (a wandb.Table) and the figure to the W&B run of the run that wrote
    `checkpoint`, when it used W&B (logger.type=wandb and <run dir>/wandb_run_id.txt), in the
    mode it used (offline works); the run id, or None when it did not use W&B."""
    import yaml

    from elastic_megatron.inference.loading import open_for_inference

    opened = open_for_inference(checkpoint)
    # the run dir: the checkpoint's own, or the one above checkpoints/iter_*
    run_dir = opened.path.parent.parent if opened.path.parent.name == "checkpoints" else opened.path
    id_file = run_dir / "wandb_run_id.txt"
    job = yaml.safe_load(opened.meta.get("config") or "{}") or {}
    logger = job.get("logger") or {}
    if logger.get("type") != "wandb" or not id_file.exists():
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=logger.get("project"), entity=logger.get("entity"), id=id_file.read_text().strip(),
                     resume="allow", dir=str(run_dir), mode=logger.get("mode") or "offline")
    columns = ["model", "precision", "budget", "task", "metric", "filter", "value", "stderr", "samples", "seconds"]
    run.log({"tasks/results": wandb.Table(columns=columns, data=[[getattr(s, c) for c in columns] for s in scores]),
             "tasks/figure": wandb.Image(str(paths["png"]))})
    run.finish()
    return run.id
