"""Tokenizers for preprocessing and training.

- `byte`: UTF-8 bytes 0..255 plus an end-of-document token (256): needs nothing, used by
  the embedded default corpus and tests. `byte_tokenizer_json()` is the same tokenizer
  for the `tokenizers` library (what every HF export of a byte model carries).
- `hf`: any Hugging Face tokenizer read from a local `tokenizer.json` (or a directory that
  holds one) with the `tokenizers` library: the real Nemotron tokenizer on clusters, or a
  BPE trained here by `train_bpe`. Nothing is downloaded.

`describe()` records how to rebuild a tokenizer; preprocessing stores it next to the data
so training rebuilds the same tokenizer from the data alone. `token_bytes()` gives the
UTF-8 bytes each token stands for, so that evaluation reports bits per byte, which
compares models across tokenizers. `hf_tokenizer_files()` gives the files an HF export
carries for a tokenizer (tokenizer.json, tokenizer_config.json, and the special-token map
and chat template where the source has them), `special_token_ids()` the ids config.json
and generation_config.json name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from elastic_megatron.config.errors import ConfigError

TOKENIZER_TYPES = ("byte", "hf")
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's end-of-document token in its tokenizer.json


class ByteTokenizer:
    vocab_size = 257
    eod = 256
    eod_token = EOD_TOKEN

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


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE (GPT-2's convention, which the `tokenizers`
    ByteLevel pre-tokenizer and decoder use) stands for each byte 0..255: printable Latin-1
    bytes are their own character, the other 68 take 256, 257, ... in byte order."""
    own = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shifted = [], 0
    for b in range(256):
        if b in own:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def byte_tokenizer_json() -> str:
    """`ByteTokenizer` as a `tokenizers` tokenizer.json: token id b is byte b (a byte-level
    BPE without merges over the 256 byte symbols, the text not split), id 256 the special
    end-of-document token. Encoding gives the ids ByteTokenizer.encode gives; decoding joins
    the bytes and reads them as UTF-8 (invalid sequences as U+FFFD, as ByteTokenizer does)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    return tok.to_str(pretty=True)


# Files of an HF tokenizer directory carried into exports besides tokenizer.json, when the
# source has them (transformers 5 keeps a chat template in chat_template.jinja, older
# versions in tokenizer_config.json, which is carried whole).
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def hf_tokenizer_files(tok) -> dict[str, bytes]:
    """file name -> content of the tokenizer files an HF export carries for `tok` (a
    ByteTokenizer or an HFTokenizer): tokenizer.json and tokenizer_config.json always."""
    import json

    if isinstance(tok, ByteTokenizer):
        files = {"tokenizer.json": byte_tokenizer_json().encode()}
        source_dir = None
    else:
        file = Path(tok.path)
        file = file / "tokenizer.json" if file.is_dir() else file
        files = {"tokenizer.json": file.read_bytes()}
        source_dir = file.parent
        for name in TOKENIZER_SIDE_FILES:
            if (source_dir / name).is_file():
                files[name] = (source_dir / name).read_bytes()
    if "tokenizer_config.json" not in files:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eod_token, "pad_token": tok.eod_token,
                  "bos_token": None, "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def special_token_ids(tok) -> dict[str, Optional[int]]:
    """bos/eos/pad ids of `tok` as config.json and generation_config.json name them: eos is
    the end-of-document token; bos and pad as its tokenizer_config.json says (pad falls back
    to eos, as ours is written), bos None when it names none."""
    import json

    config = json.loads(hf_tokenizer_files(tok)["tokenizer_config.json"])
    vocab_of = (lambda t: None) if isinstance(tok, ByteTokenizer) else tok._tok.token_to_id

    def token_id(key):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken as transformers 4 writes it
            value = value.get("content")
        if value is None:
            return None
        return tok.eod if value == tok.eod_token else vocab_of(value)

    pad = token_id("pad_token")
    return {"bos_token_id": token_id("bos_token"), "eos_token_id": tok.eod, "pad_token_id": tok.eod if pad is None else pad}


def tokenizer_of_hf_dir(directory: str | Path):
    """The tokenizer of an HF directory (its tokenizer.json, the end-of-document token its
    tokenizer_config.json names as eos), or None when it holds no tokenizer.json. Our byte
    tokenizer's file reads back as ByteTokenizer, so its description matches data
    preprocessed with `--tokenizer byte`."""
    import json

    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        return None
    if file.read_text() == byte_tokenizer_json():
        return ByteTokenizer()
    eos = None
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return HFTokenizer(str(directory), eos)


def named_tokenizer(name: str, key: str = "data.tokenizer"):
    """The tokenizer a user names for data that carry no record of theirs: 'byte', a
    tokenizer.json, an HF tokenizer directory (tokenizer.json, and the eos token of its
    tokenizer_config.json), or a run directory of tools/import_hf.py or one of its
    checkpoints (the run's tokenizer/)."""
    if name == "byte":
        return ByteTokenizer()
    path = Path(name)
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(str(path))
    # A run dir of tools/import_hf.py keeps the source's tokenizer in tokenizer/, beside
    # checkpoints/iter_N (which may be named too).
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    for directory in (path, run_dir / "tokenizer"):
        if (directory / "tokenizer.json").is_file():
            return tokenizer_of_hf_dir(directory)
    raise ConfigError(key, name, "no tokenizer there; allowed: 'byte', a tokenizer.json, an HF tokenizer directory "
                      "(tokenizer.json + tokenizer_config.json), or a run directory of tools/import_hf.py (tokenizer/)")


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
