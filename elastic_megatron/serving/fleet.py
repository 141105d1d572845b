"""Which budgets the server runs itself and which it sends to upstream servers: the
`--upstream NAME=URL` options and the `--upstreams FILE` YAML, checked before anything
heavy is imported (a bad entry is one line, exit 2).

    model_name: nemotron-elastic      # the model ids' <name> (default: --model-name, the checkpoint's)
    tokenizer: slices/small           # a slice, checkpoint or HF directory, or a tokenizer.json
    max_model_len: 8192               # prompt + new tokens (default: the smallest any budget reports)
    timeout: 60                       # defaults of every upstream below
    connect_timeout: 5
    upstreams:
      small:                          # the budget's name: <name>:small
        url: http://node1:8000/v1
        model: slices/small           # the upstream's model id (needed when it serves several)
        api_key_env: SMALL_KEY        # or api_key: ... (sent as Authorization: Bearer)
        timeout: 120                  # seconds without a byte from it: then 504
        prompt_ids: true              # false: it takes text prompts only (re-tokenized there)
      full:
        url: http://node2:8000/v1
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from elastic_megatron.config.errors import ConfigError

BUDGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # as a model id's suffix: no ':' or spaces
TOP_KEYS = ("model_name", "tokenizer", "max_model_len", "timeout", "connect_timeout", "upstreams")
UPSTREAM_KEYS = ("url", "model", "api_key", "api_key_env", "timeout", "connect_timeout", "prompt_ids")


@dataclass
class UpstreamConfig:
    budget: str
    url: str  # the OpenAI base URL, e.g. http://node1:8000/v1
    model: Optional[str] = None  # None: the one model its /v1/models lists
    api_key: Optional[str] = None
    timeout: float = 60.0  # seconds without a byte (first token included) before 504
    connect_timeout: float = 5.0
    prompt_ids: bool = True  # prompts sent as token ids (vLLM, SGLang, llama.cpp, tools/serve.py take them)

    @property
    def root(self) -> str:
        """The server's root (where /tokenize and /health live): the URL without /v1."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url

    def describe(self) -> str:
        return f"upstream {self.budget!r} ({self.url})"


@dataclass
class FleetConfig:
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    model_name: Optional[str] = None
    tokenizer: Optional[str] = None
    max_model_len: Optional[int] = None

    def budgets(self) -> list[str]:
        return [u.budget for u in self.upstreams]


def fleet_config(cli: list[str], file: Optional[str] = None, timeout: float = 60.0) -> FleetConfig:
    """The upstreams of `--upstream NAME=URL` (each with `timeout`) and of the YAML `file`."""
    fleet = _read_file(file) if file else FleetConfig()
    for entry in cli:
        name, sep, url = entry.partition("=")
        if not sep or not name or not url:
            raise ConfigError("--upstream", entry, "must be NAME=URL, e.g. small=http://node1:8000/v1")
        fleet.upstreams.append(_upstream(name.strip(), {"url": url.strip(), "timeout": timeout}, "--upstream"))
    seen = set()
    for u in fleet.upstreams:
        if u.budget in seen:
            raise ConfigError("--upstream", u.budget, "names a budget twice; each budget has one upstream")
        seen.add(u.budget)
    return fleet


def _read_file(file: str) -> FleetConfig:
    import yaml

    path = Path(file)
    if not path.is_file():
        raise ConfigError("--upstreams", file, "does not exist (a YAML file with an `upstreams:` mapping)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("--upstreams", file, f"is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("upstreams"), dict) or not data["upstreams"]:
        raise ConfigError("--upstreams", file, "must hold a mapping with `upstreams:` (budget name -> {url: ...})")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{file}: {unknown[0]}", data[unknown[0]], f"unknown key; allowed: {list(TOP_KEYS)}")
    defaults = {k: data[k] for k in ("timeout", "connect_timeout") if k in data}
    fleet = FleetConfig(model_name=data.get("model_name"), tokenizer=data.get("tokenizer"),
                        max_model_len=data.get("max_model_len"))
    if fleet.max_model_len is not None and (isinstance(fleet.max_model_len, bool) or not isinstance(fleet.max_model_len, int)
                                            or fleet.max_model_len < 2):
        raise ConfigError(f"{file}: max_model_len", fleet.max_model_len, "must be an integer >= 2")
    for name, entry in data["upstreams"].items():
        if isinstance(entry, str):
            entry = {"url": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{file}: upstreams.{name}", entry, "must be a URL or a mapping with url:")
        unknown = sorted(set(entry) - set(UPSTREAM_KEYS))
        if unknown:
            raise ConfigError(f"{file}: upstreams.{name}.{unknown[0]}", entry[unknown[0]],
                              f"unknown key; allowed: {list(UPSTREAM_KEYS)}")
        fleet.upstreams.append(_upstream(str(name), {**defaults, **entry}, f"{file}: upstreams.{name}"))
    return fleet


def _upstream(name: str, entry: dict, key: str) -> UpstreamConfig:
    if not BUDGET_NAME.match(name):
        raise ConfigError(key, name, "a budget name is letters, digits, '_', '.', '-' (it becomes <name>:<budget>)")
    url = str(entry.get("url") or "").rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{key}.url" if ":" in key else key, url or None,
                          "must be an http(s) URL of an OpenAI-compatible server, e.g. http://node1:8000/v1")
    api_key = entry.get("api_key")
    if entry.get("api_key_env"):
        api_key = os.environ.get(entry["api_key_env"])
        if not api_key:
            raise ConfigError(f"{key}.api_key_env", entry["api_key_env"], "is not set in the environment")
    values = {}
    for k in ("timeout", "connect_timeout"):
        if k in entry:
            v = entry[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{key}.{k}", v, "must be a number of seconds > 0")
            values[k] = float(v)
    prompt_ids = entry.get("prompt_ids", True)
    if not isinstance(prompt_ids, bool):
        raise ConfigError(f"{key}.prompt_ids", prompt_ids, "must be true or false")
    model = entry.get("model")
    return UpstreamConfig(name, url, None if model is None else str(model), api_key, prompt_ids=prompt_ids, **values)
