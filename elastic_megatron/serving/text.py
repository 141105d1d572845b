"""Text in and out of the server: prompts to token ids, generated ids to text as they come
(with stop strings and what a stream may show yet), token strings for log-probs, chat
templates.

- `encode`: the checkpoint's tokenizer (what `ElasticGenerator.encode` uses), with its
  end-of-document token written as text (e.g. "<|endoftext|>") read as that token, as a
  Hugging Face tokenizer reads its special tokens (the byte tokenizer would otherwise
  spell it out in bytes): lm-evaluation-harness's remote tokenizer finds the id that way.
- `Detokenizer`: incremental decoding over a window of the last tokens (as vLLM does), so a
  character split over byte tokens appears once whole and no step decodes the whole text.
- `OutputText`: a sequence's completion text, the stop strings found in it, and the part a
  stream may send (never the first characters of a stop string not yet complete).
- Chat: the tokenizer's own chat template when its directory has one (chat_template.jinja,
  chat_template.json, or tokenizer_config.json's "chat_template"), else `PLAIN_CHAT_TEMPLATE`:
  one "Role: content" line per message, then "Assistant:".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from elastic_megatron.data.tokenizer import ByteTokenizer

# The template of a tokenizer without one of its own (the byte tokenizer, a BPE trained here):
#   System: You are terse.
#   User: Hi
#   Assistant:
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole character


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, its end-of-document token spelled out read as that token."""
    marker = getattr(tokenizer, "eod_token", None)
    if not marker or marker not in text:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(text.split(marker)):
        if i:
            ids.append(tokenizer.eod)
        if piece:
            ids.extend(tokenizer.encode(piece))
    return ids


def token_string(tokenizer, token: int, as_id: bool = False) -> str:
    """How a token is shown in log-probs: its text; "bytes:\\xNN" for a byte that is no
    character alone (as OpenAI shows them); "token_id:<id>" for ids without text (padding
    rows of the model's vocabulary) or when `as_id`."""
    if as_id:
        return f"token_id:{token}"
    if token == tokenizer.eod:
        return tokenizer.eod_token
    if isinstance(tokenizer, ByteTokenizer) and token < 256:
        try:
            return bytes([token]).decode("utf-8")
        except UnicodeDecodeError:
            return f"bytes:\\x{token:02x}"
    text = tokenizer.decode([token]) if token < tokenizer.vocab_size else ""
    if not text or REPLACEMENT in text:
        return f"token_id:{token}"
    return text


class Detokenizer:
    """The text of a growing list of token ids; `add` returns the new characters (none
    while the last tokens are an incomplete character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: decoding starts here, so earlier bytes cannot change it
        self._read = 0  # tokens whose text is in self.text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read])
        after = decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
        return piece


def text_offsets(tokenizer, tokens: Sequence[int]) -> list[int]:
    """The character offset in the decoded text where each token's text begins."""
    detok = Detokenizer(tokenizer)
    out = []
    for token in tokens:
        out.append(len(detok.text))
        detok.add(token)
    return out


class OutputText:
    """A sequence's completion text as tokens arrive. Stop strings are looked for from
    `stop_from` on (budget control: in the answer only); `shown` characters went out."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.stop_from = 0
        self.shown = 0
        self.stopped_at: Optional[int] = None

    @property
    def text(self) -> str:
        return self.detok.text

    def add(self, token: int) -> str:
        """Take a token; the text a stream may send now ("" if none). After a stop string
        is found `stopped_at` is set and nothing more is shown."""
        before = len(self.detok.text)
        if not self.detok.add(token):
            return ""
        text = self.detok.text
        if self.stops:
            begin = max(self.stop_from, before - self.hold)
            found = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
            if found:
                self.stopped_at = min(found)
                return self._show(self.stopped_at)
        return self._show(max(self.shown, len(text) - self.hold if self.stops else len(text)))

    def _show(self, end: int) -> str:
        piece = self.detok.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece

    def final(self) -> tuple[str, str]:
        """(the whole completion text, what a stream has not shown of it yet). Without a
        stop string the text is the decoding of all the tokens at once (what
        `tools/generate.py` prints); a stream's pieces always add up to it."""
        if self.stopped_at is not None:
            return self.detok.text[:self.stopped_at], ""
        whole = self.tokenizer.decode(self.detok.tokens)
        shown = self.detok.text[:self.shown]
        return whole, whole[len(shown):] if whole.startswith(shown) else ""


# ---- chat ----------------------------------------------------------------------------------------


def chat_template_of(tokenizer) -> tuple[str, dict]:
    """(the chat template, the special tokens it may use: bos_token, eos_token) of the
    tokenizer's directory, or the plain template."""
    specials = {"bos_token": "", "eos_token": getattr(tokenizer, "eod_token", "") or ""}
    path = getattr(tokenizer, "path", None)
    if not path:
        return PLAIN_CHAT_TEMPLATE, specials
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    template = None
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("bos_token", "eos_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                specials[key] = value
        template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    elif (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template or PLAIN_CHAT_TEMPLATE), specials


class ChatTemplate:
    def __init__(self, tokenizer):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.specials = chat_template_of(tokenizer)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.specials, **kwargs})


def _raise(message: str):
    raise ValueError(message)
