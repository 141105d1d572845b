"""Tokenizers for preprocessing and training.

- `byte`: UTF-8 bytes 0..255 plus an end-of-document token (256): needs nothing, used by
  the embedded default corpus and tests.
- `hf`: any Hugging Face tokenizer read from a local `tokenizer.json` (or a directory that
  holds one) with the `tokenizers` library: the real Nemotron tokenizer on clusters, or a
  BPE trained here by `train_bpe`. Nothing is downloaded.

`describe()` records how to rebuild a tokenizer; preprocessing stores it next to the data
so training rebuilds the same tokenizer from the data alone. `token_bytes()` gives the
UTF-8 bytes each token stands for, so that evaluation reports bits per byte, which
compares models across tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from elastic_megatron.config.errors import ConfigError

TOKENIZER_TYPES = ("byte", "hf")
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": "byte"}

    def token_bytes(self) -> list[int]:
        """One byte per byte token; the end-of-document token stands for no text."""
        return [1] * 256 + [0]


class HFTokenizer:
    def __init__(self, path: str, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError("data.tokenizer.path", path, "must be a tokenizer.json file or a directory containing one")
        self.path = str(Path(path).resolve())
        self._tok = Tokenizer.from_file(str(file))
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids) if i is not None]
        if not found:
            raise ConfigError("data.tokenizer.eod_token", eod_token, f"no end-of-document token in {file}; tried {list(candidates)}")
        self.eod_token, self.eod = found[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def describe(self) -> dict:
        return {"type": "hf", "path": self.path, "eod_token": self.eod_token}

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes of text each token id stands for; special (added) tokens none.

        Exact for byte-level BPE (GPT-2 style, Nemotron's, and what `train_bpe` makes):
        there every character of a token's string is one byte of the text. Otherwise
        byte-fallback pieces `<0xNN>` count one byte and other pieces the UTF-8 length of
        their text, a SentencePiece word-start marker counting as the space it stands for."""
        import json

        special = {int(i) for i in self._tok.get_added_tokens_decoder()}
        byte_level = "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder"))
        out = [0] * self.vocab_size
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in special or i >= self.vocab_size:
                continue
            if byte_level:
                out[i] = len(piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out


def build_tokenizer(type: str, path: Optional[str] = None, eod_token: Optional[str] = None):
    if type == "byte":
        return ByteTokenizer()
    if type == "hf":
        if not path:
            raise ConfigError("data.tokenizer.path", path, "the hf tokenizer needs a local tokenizer.json or a directory holding one")
        if not Path(path).exists():
            raise ConfigError("data.tokenizer.path", path, "does not exist; give a local tokenizer.json or a directory holding one")
        return HFTokenizer(path, eod_token)
    raise ConfigError("data.tokenizer.type", type, f"allowed: {list(TOKENIZER_TYPES)}")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer descriptions (`describe()`) make the same token ids: the same
    type and, for hf, the same end-of-document token and the same tokenizer.json content
    (wherever it lies)."""
    if a.get("type") != b.get("type"):
        return False
    if a.get("type") != "hf":
        return True
    if a.get("eod_token") != b.get("eod_token"):
        return False
    files = [Path(d.get("path") or "") for d in (a, b)]
    files = [f / "tokenizer.json" if f.is_dir() else f for f in files]
    if all(f.is_file() for f in files):
        return files[0].read_bytes() == files[1].read_bytes()
    return a.get("path") == b.get("path")


def tokenizer_from_description(desc: dict):
    return build_tokenizer(desc.get("type"), desc.get("path"), desc.get("eod_token"))


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE on `texts`, save it as tokenizer.json at `out_path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(str(out_path), "<|endoftext|>")
