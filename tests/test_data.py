"""Data pipeline: tokenizers, preprocessing into Megatron indexed datasets, datasets and
the resumable data-parallel loader, and clear errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.data.datasets import DataSpec, build_datasets, load_tokenizer_for, make_loader, validate_data_spec
from elastic_megatron.data.indexed import data_prefix, preprocess
from elastic_megatron.data.tokenizer import ByteTokenizer, build_tokenizer, train_bpe

from conftest import REPO

TEXT = ["def add(a, b):\n    return a + b\n", "Ünïcödé text, with émojis 🙂 and tabs\t.", "class A:\n    pass\n"]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXT:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eod == 256 and tok.vocab_size == 257


def test_trained_bpe_round_trips_and_reloads(tmp_path):
    corpus = [t * 20 for t in TEXT] * 5
    bpe = train_bpe(corpus, 300, tmp_path / "tok.json")
    assert bpe.vocab_size <= 300 and bpe.eod == bpe._tok.token_to_id("<|endoftext|>")
    for text in TEXT:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(TEXT[0] * 20)) < len(TEXT[0].encode() * 20)  # it merges
    again = build_tokenizer("hf", str(tmp_path / "tok.json"))
    assert again.encode(TEXT[2]) == bpe.encode(TEXT[2])


def test_hf_tokenizer_from_file_and_directory(tmp_path):
    bpe = train_bpe([t * 10 for t in TEXT], 280, tmp_path / "dir" / "tokenizer.json")
    from_file = build_tokenizer("hf", str(tmp_path / "dir" / "tokenizer.json"))
    from_dir = build_tokenizer("hf", str(tmp_path / "dir"))
    assert from_file.encode(TEXT[0]) == from_dir.encode(TEXT[0]) == bpe.encode(TEXT[0])


def test_preprocess_jsonl_and_txt_read_back_exactly(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXT) + "\n")
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\nsecond line\n")
    tok = ByteTokenizer()
    stats = preprocess([str(jsonl), str(txt)], tmp_path / "out", tok, split_lines=True, progress=False)
    ds = IndexedDataset(data_prefix(tmp_path / "out"))
    expected = [tok.encode(t) + [tok.eod] for t in TEXT + ["first line", "second line"]]
    assert [list(ds[i]) for i in range(len(ds))] == expected
    assert stats["documents"] == 5 and stats["tokens"] == sum(map(len, expected))
    meta = json.loads((tmp_path / "out.tokenizer.meta.json").read_text())
    assert meta["tokenizer"] == {"type": "byte"} and meta["documents"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_preprocess_tool_refuses_to_overwrite(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", "python-stdlib",
           "--max-bytes", "20000", "--output-prefix", str(tmp_path / "s")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "s_text_document.bin").exists() and (tmp_path / "s_text_document.idx").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "--overwrite" in second.stderr
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120).returncode == 0


def _spec(prefixes, tmp_path, seed=1, weights=None):
    return DataSpec(prefixes=prefixes, weights=weights, split="90,10,0", seq_length=32, seed=seed, cache_dir=str(tmp_path / "cache"))


def test_blend_datasets_and_exact_loader_resume(dist, stdlib_prefix, tmp_path):
    tok = load_tokenizer_for([stdlib_prefix])
    spec = _spec([stdlib_prefix, stdlib_prefix], tmp_path, weights=[0.7, 0.3])
    validate_data_spec(spec)
    train, valid = build_datasets(spec, tok, train_samples=64, valid_samples=8)
    assert len(train) >= 64 and len(valid) >= 8
    batch = next(make_loader(train, 0, 4, 0, 1))
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == torch.int64
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])

    straight = make_loader(train, 0, 2, 0, 1)
    full = [next(straight) for _ in range(8)]
    half = make_loader(train, 4 * 2, 2, 0, 1)
    assert all(torch.equal(full[4 + i]["tokens"], next(half)["tokens"]) for i in range(4))
    # Two DP ranks with micro batch 2 cover what one rank sees with micro batch 4.
    one = next(make_loader(train, 0, 4, 0, 1))["tokens"]
    r0, r1 = next(make_loader(train, 0, 2, 0, 2))["tokens"], next(make_loader(train, 0, 2, 1, 2))["tokens"]
    assert torch.equal(torch.cat([r0, r1]), one)

    again, _ = build_datasets(spec, tok, 64, 8)
    other, _ = build_datasets(_spec([stdlib_prefix, stdlib_prefix], tmp_path, seed=2, weights=[0.7, 0.3]), tok, 64, 8)
    assert all(np.array_equal(again[i]["tokens"], train[i]["tokens"]) for i in range(8))
    assert not all(np.array_equal(other[i]["tokens"], train[i]["tokens"]) for i in range(8))


@pytest.mark.parametrize(
    "make,key",
    [
        (lambda p, t: _spec(["missing/x_text_document"], t), "data.prefixes"),
        (lambda p, t: _spec([p], t, weights=[1.0, 2.0]), "data.weights"),
        (lambda p, t: DataSpec([p], None, "100,0,0", 32, 1, str(t)), "data.split"),
        (lambda p, t: DataSpec([p], None, "a,b", 32, 1, str(t)), "data.split"),
    ],
)
def test_bad_data_specs(stdlib_prefix, tmp_path, make, key):
    with pytest.raises(ConfigError) as err:
        validate_data_spec(make(stdlib_prefix, tmp_path))
    assert err.value.key == key


def test_bad_tokenizers(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_tokenizer("hf", str(tmp_path / "nope"))
    assert err.value.key == "data.tokenizer.path" and "does not exist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_tokenizer("sentencepiece")
    assert err.value.key == "data.tokenizer.type" and "byte" in str(err.value)
