"""Data pipeline: tokenizers, preprocessing into Megatron indexed datasets, datasets and
the resumable data-parallel loader, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.mark.slow
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
    letters = _letters(tmp_path, "a", "a", LENGTHS)
    tok = load_tokenizer_for([stdlib_prefix, letters])
    spec = _spec([stdlib_prefix, letters], tmp_path, weights=[0.7, 0.3])
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
    other, _ = build_datasets(_spec([stdlib_prefix, letters], tmp_path, seed=2, weights=[0.7, 0.3]), tok, 64, 8)
    assert all(np.array_equal(again[i]["tokens"], train[i]["tokens"]) for i in range(8))
    assert not all(np.array_equal(other[i]["tokens"], train[i]["tokens"]) for i in range(8))
    # Both prefixes are read, in the blend's proportions.
    from_letters = [_from(train[i]["tokens"], ord("a")) for i in range(64)]
    assert sum(from_letters) / 64 == pytest.approx(0.3, abs=1 / 32)


def _from(tokens, letter: int) -> bool:
    """Whether a sample comes from a letters dataset of `letter`: it holds that letter
    and end-of-document tokens, nothing else."""
    return set(np.asarray(tokens).tolist()) <= {letter, ByteTokenizer.eod}


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1.0, 4.0]])
def test_blend_weights_set_each_prefix_share_of_the_samples(dist, tmp_path, weights):
    """Two prefixes of different content: the share of samples from each, in the training
    micro-batches the loader yields and in the validation split, is its weight's share."""
    a = _letters(tmp_path, "a", "a", LENGTHS)
    b = _letters(tmp_path, "b", "b", LENGTHS)
    tok = load_tokenizer_for([a, b])
    train, valid = build_datasets(_spec([a, b], tmp_path, weights=weights), tok, train_samples=400, valid_samples=100)
    share_a = weights[0] / sum(weights)
    loader = make_loader(train, 0, 8, 0, 1)
    seen = [tokens for _ in range(50) for tokens in next(loader)["tokens"]]
    assert all(_from(t, ord("a")) != _from(t, ord("b")) for t in seen)  # each sample from one prefix
    assert sum(_from(t, ord("a")) for t in seen) / len(seen) == pytest.approx(share_a, abs=0.01)
    assert sum(_from(valid[i]["tokens"], ord("a")) for i in range(100)) / 100 == pytest.approx(share_a, abs=0.02)


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


# --- Faults injected into the data: a mismatched pair is refused when the dataset opens;
# data re-made in place never reuse a stale index cache.

def _letters(tmp_path, name, letter, lengths, overwrite=False) -> str:
    """A byte-level dataset of one document per entry of `lengths`, each `letter` repeated."""
    txt = tmp_path / f"{name}.txt"
    txt.write_text("".join(letter * n + "\n" for n in lengths))
    preprocess([str(txt)], tmp_path / name, ByteTokenizer(), split_lines=True, overwrite=overwrite, progress=False)
    return data_prefix(tmp_path / name)


LENGTHS = [120 + 7 * i for i in range(24)]


def _foreign_idx(a, b, tmp_path):
    shutil.copyfile(b + ".idx", a + ".idx")
    return a + ".bin"


def _truncated_bin(a, b, tmp_path):
    size = os.path.getsize(a + ".bin")
    os.truncate(a + ".bin", size - 100)
    return a + ".bin"


def _truncated_idx(a, b, tmp_path):
    os.truncate(a + ".idx", os.path.getsize(a + ".idx") - 8)
    return a + ".idx"


def _not_an_idx(a, b, tmp_path):
    shutil.copyfile(a + ".bin", a + ".idx")
    return a + ".idx"


def _unknown_dtype(a, b, tmp_path):
    with open(a + ".idx", "r+b") as f:
        f.seek(17)  # magic (9) + version (8): the dtype code
        f.write(bytes([42]))
    return a + ".idx"


def _pair_of_another_dataset(a, b, tmp_path):
    # A consistent .bin/.idx pair, but not the one the tokenizer description was written with.
    shutil.copyfile(b + ".bin", a + ".bin")
    shutil.copyfile(b + ".idx", a + ".idx")
    return "tokenizer.meta.json"


def _vocab_beyond_dtype(a, b, tmp_path):
    meta = tmp_path / "a.tokenizer.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "vocab_size": 70000}))
    return "uint16"


@pytest.mark.parametrize("fault,expect", [
    (_foreign_idx, "or the .idx belongs to another dataset"),
    (_truncated_bin, "truncated"),
    (_truncated_idx, "truncated"),
    (_not_an_idx, "not a Megatron index file"),
    (_unknown_dtype, "Megatron does not know"),
    (_pair_of_another_dataset, "records 24 documents"),
    (_vocab_beyond_dtype, "70,000"),
])
def test_inconsistent_data_files_are_refused_naming_the_file(tmp_path, fault, expect):
    a = _letters(tmp_path, "a", "a", LENGTHS)
    b = _letters(tmp_path, "b", "b", [50 + i for i in range(20)])
    spec = _spec([a], tmp_path)
    validate_data_spec(spec)  # the intact pair passes
    named = fault(a, b, tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_data_spec(spec)
    message = str(err.value)
    assert err.value.key == "data.prefixes" and err.value.value == a
    assert named in message and expect in message and "tools/preprocess_data.py" in message, message


def test_foreign_idx_message_gives_the_sizes(tmp_path):
    a = _letters(tmp_path, "a", "a", LENGTHS)
    b = _letters(tmp_path, "b", "b", [50 + i for i in range(20)])
    shutil.copyfile(b + ".idx", a + ".idx")
    with pytest.raises(ConfigError) as err:
        validate_data_spec(_spec([a], tmp_path))
    a_bytes, b_tokens = 2 * sum(n + 1 for n in LENGTHS), sum(51 + i for i in range(20))
    assert (f"{a}.bin holds {a_bytes:,} bytes but its index {a}.idx describes {2 * b_tokens:,} bytes of uint16 "
            f"tokens (20 documents, {b_tokens:,} tokens)") in str(err.value)


def _cache_files(cache):
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}


def _sample_tokens(dataset, n=None) -> set:
    n = len(dataset) if n is None else n
    return set(np.concatenate([dataset[i]["tokens"] for i in range(n)]).tolist())


def _made_of(dataset, *letters) -> bool:
    """The samples hold every one of `letters` and nothing else but end-of-document tokens."""
    tokens = _sample_tokens(dataset)
    return set(letters) <= tokens <= set(letters) | {ByteTokenizer.eod}


def test_remade_data_rebuild_their_cache_and_untouched_data_reuse_it(dist, tmp_path):
    a = _letters(tmp_path, "a", "a", LENGTHS)
    b = _letters(tmp_path, "b", "b", LENGTHS)
    tok = load_tokenizer_for([a, b])
    spec_a, spec_b = _spec([a], tmp_path), _spec([b], tmp_path)
    spec_ab = _spec([a, b], tmp_path, weights=[0.5, 0.5])
    cache = tmp_path / "cache"
    A, B, X = ord("a"), ord("b"), ord("x")

    train_a, valid_a = build_datasets(spec_a, tok, 16, 4)
    build_datasets(spec_b, tok, 16, 4)
    train_ab, _ = build_datasets(spec_ab, tok, 16, 4)
    assert _made_of(train_a, A) and _made_of(valid_a, A) and _made_of(train_ab, A, B)
    built = _cache_files(cache)
    assert sum("BlendedDataset" in name for name in built) > 0

    # Re-make `a` in place: new content, other document lengths and count.
    _letters(tmp_path, "a", "x", [90 + 11 * i for i in range(30)], overwrite=True)
    validate_data_spec(spec_a)

    # The untouched data reuse their cache: no file written or rewritten.
    build_datasets(spec_b, tok, 16, 4)
    assert _cache_files(cache) == built

    # The re-made data get new GPTDataset caches and samples from the new content ...
    train_a, valid_a = build_datasets(spec_a, tok, 16, 4)
    after_a = _cache_files(cache)
    new = set(after_a) - set(built)
    assert new and all("GPTDataset" in name for name in new)
    assert {k: after_a[k] for k in built} == built  # the old cache files are left as they were
    assert _made_of(train_a, X) and _made_of(valid_a, X)

    # ... and a blend holding them a new BlendedDataset cache as well.
    train_ab, valid_ab = build_datasets(spec_ab, tok, 16, 4)
    new = set(_cache_files(cache)) - set(after_a)
    assert any("BlendedDataset" in name for name in new)
    assert _made_of(train_ab, X, B) and A not in _sample_tokens(valid_ab)

    # Building again finds everything in the cache.
    again = _cache_files(cache)
    build_datasets(spec_a, tok, 16, 4)
    build_datasets(spec_ab, tok, 16, 4)
    assert _cache_files(cache) == again


def test_same_lengths_new_tokens_keep_the_cache_and_read_the_new_tokens(dist, tmp_path):
    # The cached indices are positions derived from the .idx alone: data re-made with the
    # same document lengths keep a valid cache, and the samples come from the new .bin.
    a = _letters(tmp_path, "a", "a", LENGTHS)
    tok = load_tokenizer_for([a])
    spec = _spec([a], tmp_path)
    train, _ = build_datasets(spec, tok, 16, 4)
    first = [np.array(train[i]["tokens"]) for i in range(len(train))]
    built = _cache_files(tmp_path / "cache")
    _letters(tmp_path, "a", "c", LENGTHS, overwrite=True)
    validate_data_spec(spec)
    train, _ = build_datasets(spec, tok, 16, 4)
    assert _cache_files(tmp_path / "cache") == built
    for i, old in enumerate(first):
        assert np.array_equal(np.where(old == ord("a"), ord("c"), old), train[i]["tokens"])
