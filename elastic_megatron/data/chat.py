"""Chat and reasoning data: JSON-lines of conversations, rendered with the tokenizer's own
chat template.

One conversation per line, OpenAI's format:

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "reasoning_content": "..."}]}

Roles are system, user and assistant; `content` is a string or a list of text parts
(`{"type": "text", "text": "..."}`); an assistant turn may carry its reasoning in
`reasoning_content`. Each conversation becomes one document: the text the chat template of
the HF tokenizer directory renders (`apply_chat_template(..., tokenize=False)`), so the
`<think>` markup and turn tokens are the parent's own. `earlier_reasoning="drop"` removes
the reasoning of every assistant turn before the last one before rendering (what
templates that show only the latest reasoning do at inference); "keep" passes it all and
leaves the choice to the template.

A bad line (not UTF-8, not JSON, no `messages` list, an unknown role, a content that is
not text) is reported with its file and line number: `bad_chat_lines` finds them all
before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from elastic_megatron.config.errors import ConfigError

CHAT_ROLES = ("system", "user", "assistant")
EARLIER_REASONING = ("keep", "drop")
BAD_LINE_ACTIONS = ("error", "skip")
BAD_LINES_SHOWN = 20  # line numbers an error message or the stats list


class BadChatLine(ValueError):
    pass


@dataclass(frozen=True)
class ChatOptions:
    """How conversations are rendered (picklable: every preprocessing worker renders)."""

    tokenizer_dir: str
    earlier_reasoning: str = "keep"
    template_kwargs: dict = field(default_factory=dict)


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadChatLine(f"{where} has a content part that is not text ({str(part)[:60]})")
            parts.append(part["text"])
        return "".join(parts)
    raise BadChatLine(f"{where} content is {type(content).__name__}, not a string or a list of text parts")


def parse_chat_line(raw: bytes) -> list[dict]:
    """The conversation of one JSON line, each turn {role, content[, reasoning_content]}
    with text content; BadChatLine saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadChatLine(f"not UTF-8 (byte {err.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise BadChatLine(f"not JSON ({err.msg})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadChatLine("no 'messages' list")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise BadChatLine(f"message {i} has role {role!r}; allowed: {list(CHAT_ROLES)}")
        turn = {"role": role, "content": _text_of(message.get("content") or "", f"message {i}")}
        reasoning = message.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise BadChatLine(f"message {i}: reasoning_content must be a string on an assistant turn")
            turn["reasoning_content"] = reasoning
        turns.append(turn)
    return turns


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def bad_chat_lines(inputs: Sequence[str]) -> list[tuple[str, int, str]]:
    """(file, line number, why) of every bad line of the chat files `inputs`."""
    bad = []
    for path in inputs:
        for n, raw in _lines(path):
            try:
                parse_chat_line(raw)
            except BadChatLine as err:
                bad.append((path, n, str(err)))
    return bad


def describe_bad_lines(bad: list[tuple[str, int, str]]) -> str:
    shown = "; ".join(f"{path}:{n} {why}" for path, n, why in bad[:BAD_LINES_SHOWN])
    more = f"; and {len(bad) - BAD_LINES_SHOWN} more" if len(bad) > BAD_LINES_SHOWN else ""
    return f"{len(bad)} bad line{'s' * (len(bad) != 1)}: {shown}{more}"


def chat_conversations(inputs: Sequence[str], skipped: Optional[list] = None) -> Iterator[list[dict]]:
    """Every good conversation of `inputs` in order; bad lines are appended to `skipped`
    as (file, line number, why)."""
    for path in inputs:
        for n, raw in _lines(path):
            try:
                yield parse_chat_line(raw)
            except BadChatLine as err:
                if skipped is not None:
                    skipped.append((path, n, str(err)))


def load_chat_template_tokenizer(tokenizer_dir: str):
    """The HF tokenizer of `tokenizer_dir` (local files only); refused when it has no chat template."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ConfigError("--tokenizer-path", tokenizer_dir, "--input-format chat needs an HF tokenizer directory "
                          "(tokenizer.json + tokenizer_config.json with its chat template)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("--input-format", "chat", "renders with transformers' apply_chat_template: "
                          "pip install 'elastic_megatron[chat]'") from None

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise ConfigError("--tokenizer-path", tokenizer_dir, "has no chat template (chat_template in tokenizer_config.json, "
                          "or chat_template.jinja): --input-format chat renders each conversation with the tokenizer's "
                          "own template; give the directory of the model's tokenizer that has one")
    return tok


class ChatRenderer:
    def __init__(self, options: ChatOptions):
        self.options = options
        self.tokenizer = load_chat_template_tokenizer(options.tokenizer_dir)

    def render(self, turns: list[dict]) -> str:
        if self.options.earlier_reasoning == "drop":
            assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
            last = assistant[-1] if assistant else -1
            turns = [{k: v for k, v in t.items() if k != "reasoning_content" or i == last} for i, t in enumerate(turns)]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, **self.options.template_kwargs)
