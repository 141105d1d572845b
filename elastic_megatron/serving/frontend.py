"""The front end: one OpenAI endpoint over budgets run here (views of one checkpoint, the
scheduler) and budgets of upstream servers (upstream.py), with the API of a local server.

    fleet = fleet_config(["small=http://node1:8000/v1", "full=http://node2:8000/v1"])
    server = FrontEnd(fleet, "nemotron", ServeOptions(), tokenizer=front_end_tokenizer("slices/small"))
    server.run(bind("127.0.0.1", 8000))

Budgets: the local ones first, then the upstreams in the order given; the first is the
model id `<name>`. Requests are routed by budget; budget control runs where both its
budgets are: both local (the scheduler), both upstreams (upstream.RemoteBudgets); a local
and a remote budget together are refused. At start every upstream is reached once: one
that answers with another tokenizer or without the model named is refused (bad input,
exit 2); one that is down is reported and checked again when a request needs it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.serving.app import Server, ServedModel, build_app
from elastic_megatron.serving.fleet import FleetConfig
from elastic_megatron.serving.metrics import Metrics
from elastic_megatron.serving.options import ServeOptions
from elastic_megatron.serving.protocol import bad_request, now
from elastic_megatron.serving.scheduler import Scheduler, Sequence
from elastic_megatron.serving.text import ChatTemplate
from elastic_megatron.serving.upstream import RemoteBudgets, Upstream, UpstreamError, UpstreamMetrics


def front_end_tokenizer(path: str):
    """The tokenizer of a slice, checkpoint or HF directory, a directory holding a
    tokenizer.json, or a tokenizer.json."""
    from elastic_megatron.convert.checkpoint_tokenizer import is_hf_dir
    from elastic_megatron.data.tokenizer import HFTokenizer, tokenizer_of_hf_dir
    from elastic_megatron.inference.loading import open_for_inference

    p = Path(path)
    if not p.exists():
        raise ConfigError("--tokenizer", path, "does not exist (a slice or checkpoint directory, or a tokenizer.json)")
    if p.is_file():
        return HFTokenizer(str(p))
    if (p / "tokenizer.json").is_file() and not is_hf_dir(p) and not (p / "checkpoints").exists():
        return tokenizer_of_hf_dir(p)
    return open_for_inference(p, key="--tokenizer").tokenizer()


class FleetModel(ServedModel):
    """The model ids and checks of a front end: its budgets, local and remote, one tokenizer."""

    def __init__(self, tokenizer, name: str, max_len: int, budgets: list[str]):
        self.gen, self.name, self.max_len = None, name, max_len
        self.tokenizer, self.budgets = tokenizer, budgets
        self.chat = ChatTemplate(tokenizer)
        self.created = now()
        self.elastic = len(budgets) > 1


class Router:
    """What the app submits to: a request's sequences go to the scheduler or to the
    upstreams, by budget."""

    def __init__(self, local: Optional[Scheduler], remote: RemoteBudgets, max_batch: int, max_queue: int):
        self.local, self.remote = local, remote
        self.max_batch, self.max_queue = max_batch, max_queue

    @property
    def alive(self) -> bool:
        return self.local is None or self.local.alive

    def submit(self, seqs: list[Sequence]) -> None:
        used = {b for s in seqs for b in ([s.control.think_budget, s.control.answer_budget] if s.control else [s.budget])}
        remote = {b for b in used if b in self.remote.upstreams}
        if not remote:
            self.local.submit(seqs)
        elif remote == used:
            self.remote.submit(seqs)
        else:
            raise bad_request("think_budget", f"budget control between a budget run here ({sorted(used - remote)}) and "
                                              f"an upstream's ({sorted(remote)}) is not served; pick two of one kind")

    def cancel(self, seqs: list[Sequence]) -> None:
        if self.local is not None:
            self.local.cancel(seqs)
        self.remote.cancel(seqs)

    def start(self) -> None:
        if self.local is not None:
            self.local.start()
        self.remote.start()

    def stop(self) -> None:
        self.remote.stop()
        if self.local is not None:
            self.local.stop()


class FrontEnd(Server):
    """The server of a fleet: `gen`'s budgets run here (none without it), the fleet's upstreams."""

    def __init__(self, fleet: FleetConfig, name: str, options: ServeOptions, gen=None, tokenizer=None):
        options.check(gen.cfg.max_sequence_length if gen is not None else None)
        self.options = options
        local = ServedModel(gen, name, options.max_model_len or gen.cfg.max_sequence_length) if gen is not None else None
        local_budgets = local.budgets if local else []
        clash = sorted(set(local_budgets) & set(fleet.budgets()))
        if clash:
            raise ConfigError("--upstream", clash[0], f"is a budget of the checkpoint too ({local_budgets}); name the "
                                                      "upstream's budget otherwise")
        tokenizer = gen.tokenizer if gen is not None else tokenizer
        if tokenizer is None:
            raise ConfigError("--tokenizer", None, "a front end without --checkpoint needs the budgets' tokenizer: "
                                                   "--tokenizer <a slice's directory or a tokenizer.json> (or tokenizer: "
                                                   "in the --upstreams file)")
        self.upstreams = {u.budget: Upstream(u, tokenizer) for u in fleet.upstreams}
        self.down = check_at_start(self.upstreams.values())
        lengths = [u.max_model_len for u in self.upstreams.values() if u.max_model_len]
        if local is not None:
            lengths.append(local.max_len)
        max_len = options.max_model_len or fleet.max_model_len or (min(lengths) if lengths else None)
        if max_len is None:
            raise ConfigError("--max-model-len", None, "no budget is reachable to report its length; give the length "
                                                       "its upstreams serve (prompt + new tokens)")
        if gen is not None and max_len > gen.cfg.max_sequence_length:
            raise ConfigError("max_model_len", max_len, f"must be at most the checkpoint's max_sequence_length "
                                                        f"({gen.cfg.max_sequence_length}): its budgets are served here")
        budgets = local_budgets + fleet.budgets()
        self.served = FleetModel(tokenizer, name, max_len, budgets)
        self.metrics = Metrics(budgets)
        upstream_metrics = UpstreamMetrics(self.metrics, fleet.budgets())
        for u in self.upstreams.values():
            u.metrics = upstream_metrics
            upstream_metrics.up.labels(u.name).set(int(u.state == "up"))
        self.scheduler = None
        if local is not None:
            self.scheduler = Scheduler(gen, local_budgets, options.max_batch, options.max_queue, max_len, self.metrics)
            self.scheduler.warm_up()
        self.remote = RemoteBudgets(self.upstreams, tokenizer, self.metrics, options.max_batch, options.max_queue,
                                    local_budgets=len(local_budgets))
        self.router = Router(self.scheduler, self.remote, options.max_batch, options.max_queue)
        self.app = build_app(self.served, self.router, self.metrics, options.api_key, upstreams=self.remote)


def check_at_start(upstreams) -> list[str]:
    """Reach every upstream once (together): a refused one is bad input (ConfigError); the
    ones down are returned as warnings (their budgets answer 503 until they come back)."""

    async def reach_all():
        async def one(up: Upstream):
            async with up.new_client() as client:
                try:
                    await up.check(client)
                except UpstreamError as err:
                    return err
            return None

        return await asyncio.gather(*(one(u) for u in upstreams))

    down = []
    for up, err in zip(upstreams, asyncio.run(reach_all())):
        if err is None:
            continue
        if err.refused:
            raise ConfigError("--upstream", f"{up.name}={up.config.url}", err.message)
        down.append(f"warning: {err.message}; budget {up.name!r} answers 503 until it is reachable")
    for line in down:
        print(line, file=sys.stderr, flush=True)
    return down
