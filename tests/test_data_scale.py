"""Data at the recipes' scale: data tokenised by Megatron-LM (no record of ours) trained with
data.tokenizer, parallel and sharded preprocessing with the blend step, Megatron's flattened
blend, chat JSON-lines rendered through the tokenizer's own template, and the Slurm array
script's dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import split_blend
from elastic_megatron.data import indexed
from elastic_megatron.data.chat import ChatOptions
from elastic_megatron.data.datasets import DataSpec, load_tokenizer_for
from elastic_megatron.data.indexed import data_prefix, preprocess, record_tokenizer, shard_output_prefix, write_blend
from elastic_megatron.data.tokenizer import ByteTokenizer, HFTokenizer, byte_tokenizer_json, train_bpe

from conftest import REPO

WORDS = ["alpha", "beta", "gamma", "délta", "🙂", "x\n", "def f(a):", "return"]

# A chat template in the style of the reasoning models': the reasoning of an assistant turn
# between <think> tags before its answer.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{% if m.role == 'assistant' and m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>\n"
            "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


def write_jsonl_files(directory: Path, count: int, docs_each: int = 40) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = directory / f"part{i}.jsonl"
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(0, 30)))}) for _ in range(docs_each)]
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def hf_dir(directory: Path, chat_template: str | None = None, extra_tokens=()) -> str:
    """An HF tokenizer directory: the byte tokenizer (+ `extra_tokens` as special tokens) and
    a tokenizer_config.json with `chat_template`."""
    from tokenizers import AddedToken, Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(byte_tokenizer_json())
    if extra_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
        tok.save(str(directory / "tokenizer.json"))
    else:
        (directory / "tokenizer.json").write_text(byte_tokenizer_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def foreign_dataset(prefix: Path, documents: list[list[int]], dtype=np.uint16) -> str:
    """Data as Megatron-LM's tools/preprocess_data.py writes them: megatron-core's builder, no record beside."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.array(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def documents_of(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


# ---- foreign data ------------------------------------------------------------------------

def test_foreign_data_need_their_tokenizer_named_and_its_ids(tmp_path, monkeypatch):
    bpe = train_bpe([" ".join(WORDS * 20)] * 5, 300, tmp_path / "bpe" / "tokenizer.json")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 50
    docs = [bpe.encode(t) + [bpe.eod] for t in texts]
    prefix = foreign_dataset(tmp_path / "megatron_text_document", docs)

    with pytest.raises(ConfigError) as err:
        load_tokenizer_for([prefix])
    assert err.value.key == "data.prefixes" and "data.tokenizer=" in err.value.allowed
    tok = load_tokenizer_for([prefix], str(tmp_path / "bpe"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == bpe.vocab_size

    # Another tokenizer's data: ids beyond the named vocabulary (the byte tokenizer's 257).
    with pytest.raises(ConfigError, match=r"holds id \d+ at token \d+") as err:
        load_tokenizer_for([prefix], "byte")
    assert err.value.key == "data.tokenizer"
    # A dtype too narrow for the vocabulary: uint8 ids cannot name 300 tokens.
    narrow = foreign_dataset(tmp_path / "narrow_text_document", [[1, 2, 3]] * 4, dtype=np.uint8)
    with pytest.raises(ConfigError, match="uint8 ids"):
        load_tokenizer_for([narrow], str(tmp_path / "bpe"))

    # One id out of range where a bounded sample does not look: found by the full scan only.
    monkeypatch.setattr(indexed, "SCAN_BLOCK", 256)
    monkeypatch.setattr(indexed, "SCAN_SAMPLE_BLOCKS", 4)
    hidden = [list(range(200))] * 60
    hidden[30] = hidden[30][:100] + [299] + hidden[30][101:]  # token 6,100: between the sampled blocks
    hidden_prefix = foreign_dataset(tmp_path / "hidden_text_document", hidden)
    assert indexed.check_token_ids(hidden_prefix, 257, "byte") == 4 * 256
    load_tokenizer_for([hidden_prefix], "byte")
    with pytest.raises(ConfigError, match="holds id 299 at token 6,100"):
        load_tokenizer_for([hidden_prefix], "byte", token_scan="full")

    # A named tokenizer must also be the one recorded beside data made here.
    ours = tmp_path / "ours"
    preprocess(write_jsonl_files(tmp_path, 1), ours, ByteTokenizer(), progress=False)
    with pytest.raises(ConfigError, match="is not the tokenizer"):
        load_tokenizer_for([data_prefix(ours), prefix], str(tmp_path / "bpe"))

    # The record, written only on request, after every id was checked.
    with pytest.raises(ConfigError, match="holds id"):
        record_tokenizer(prefix, ByteTokenizer())
    assert not (tmp_path / "megatron.tokenizer.meta.json").exists()
    assert record_tokenizer(prefix, bpe)["tokens"] == sum(map(len, docs))
    assert load_tokenizer_for([prefix]).describe() == bpe.describe()


def test_named_tokenizer_forms(tmp_path):
    """data.tokenizer: 'byte', a tokenizer.json, an HF dir, an imported run dir or its checkpoint."""
    from elastic_megatron.data.tokenizer import named_tokenizer

    hf = hf_dir(tmp_path / "run" / "tokenizer", extra_tokens=["<x>"])
    (tmp_path / "run" / "checkpoints" / "iter_0000001").mkdir(parents=True)
    for name in (f"{hf}/tokenizer.json", hf, tmp_path / "run", tmp_path / "run" / "checkpoints" / "iter_0000001"):
        tok = named_tokenizer(str(name))
        assert isinstance(tok, HFTokenizer) and tok.vocab_size == 258 and tok.eod_token == "<|endoftext|>"
    assert isinstance(named_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match="allowed: 'byte'") as err:
        named_tokenizer(str(tmp_path / "nothing"))
    assert err.value.key == "data.tokenizer"


def test_megatron_flattened_blend():
    assert split_blend(["0.7", "a", "0.3", "b"], None) == (["a", "b"], [0.7, 0.3])
    assert split_blend(["a", "b"], [1, 2]) == (["a", "b"], [1, 2])
    spec = DataSpec(["2", "a", "1", "b"], None, "98,2,0", 64, 1, "cache")
    assert spec.prefixes == ["a", "b"] and spec.weights == [2.0, 1.0]
    with pytest.raises(ConfigError, match="a weight before every prefix"):
        split_blend(["0.7", "a", "b"], None)
    with pytest.raises(ConfigError, match="not both") as err:
        split_blend(["0.7", "a"], [1.0])
    assert err.value.key == "data.weights"


# ---- parallel and sharded preprocessing ------------------------------------------------

def test_two_workers_write_the_bytes_one_worker_writes(tmp_path):
    inputs = write_jsonl_files(tmp_path, 2, docs_each=150)
    bpe = train_bpe([" ".join(WORDS * 20)] * 5, 300, tmp_path / "bpe.json")
    one = preprocess(inputs, tmp_path / "one", bpe, progress=False)
    two = preprocess(inputs, tmp_path / "two", bpe, progress=False, workers=2)
    assert one["documents"] == two["documents"] > 250  # several chunks of documents per worker
    for ext in (".bin", ".idx"):
        assert Path(data_prefix(tmp_path / "one") + ext).read_bytes() == Path(data_prefix(tmp_path / "two") + ext).read_bytes()


def test_shards_hold_one_runs_documents_and_blend(tmp_path):
    inputs = write_jsonl_files(tmp_path, 5)
    tok = ByteTokenizer()
    whole = preprocess(inputs, tmp_path / "whole", tok, progress=False)
    shards = [preprocess(inputs, tmp_path / "web", tok, progress=False, shard=(i, 3)) for i in range(3)]
    assert [s["inputs"] for s in shards] == [inputs[0:1], inputs[1:3], inputs[3:5]]
    assert sum((documents_of(data_prefix(shard_output_prefix(tmp_path / "web", i, 3))) for i in range(3)), []) \
        == documents_of(data_prefix(tmp_path / "whole"))

    # A re-run skips a finished shard; a shard without its record (killed before the last
    # rename) is unfinished: the blend refuses the corpus until its task ran again.
    bin_file = Path(data_prefix(shard_output_prefix(tmp_path / "web", 1, 3)) + ".bin")
    stamp = bin_file.stat().st_mtime_ns
    assert preprocess(inputs, tmp_path / "web", tok, progress=False, shard=(1, 3))["skipped"]
    assert bin_file.stat().st_mtime_ns == stamp
    indexed.meta_path(shard_output_prefix(tmp_path / "web", 1, 3)).unlink()
    with pytest.raises(ConfigError, match=r"shards \[1\] of 3 are missing or unfinished"):
        write_blend([(None, str(tmp_path / "web"))], tmp_path / "blend.yaml")
    assert not preprocess(inputs, tmp_path / "web", tok, progress=False, shard=(1, 3)).get("skipped")

    blend = write_blend([(None, str(tmp_path / "web"))], tmp_path / "blend.yaml")
    assert blend["tokens"] == [s["tokens"] for s in shards] and sum(blend["tokens"]) == whole["tokens"]
    assert blend["weights"] == pytest.approx([t / whole["tokens"] for t in blend["tokens"]])
    import yaml

    assert yaml.safe_load((tmp_path / "blend.yaml").read_text()) == {"prefixes": blend["prefixes"], "weights": blend["weights"]}
    # Two corpora with weights: each shard gets its corpus's weight x its share of the corpus.
    mixed = write_blend([(0.75, str(tmp_path / "web")), (0.25, str(tmp_path / "whole"))], tmp_path / "mix.yaml")
    assert mixed["weights"] == pytest.approx([0.75 * t / whole["tokens"] for t in blend["tokens"]] + [0.25])
    preprocess(inputs[:1], tmp_path / "other", HFTokenizer(hf_dir(tmp_path / "other_tok", extra_tokens=["<x>"])), progress=False)
    with pytest.raises(ConfigError, match="one tokenizer"):
        write_blend([(None, str(tmp_path / "web")), (None, str(tmp_path / "other"))], tmp_path / "bad.yaml")


@pytest.mark.slow
def test_sharded_blend_and_foreign_data_train_and_resume(tmp_path):
    """3 shards (the tool, as the array tasks run it) + Megatron-LM data, in Megatron's flattened
    blend form, train with data.tokenizer; without it the job is refused; it resumes."""
    from elastic_helpers import train_overrides

    from elastic_megatron.train import run

    inputs = write_jsonl_files(tmp_path, 3, docs_each=60)
    for i in range(3):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *inputs,
                               "--output-prefix", str(tmp_path / "web"), "--shard", f"{i}/3"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    blend = write_blend([(None, str(tmp_path / "web"))], tmp_path / "blend.yaml")
    text = (REPO / "elastic_megatron" / "data" / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")  # shipped
    foreign = foreign_dataset(tmp_path / "megatron_text_document",
                              [list(text[i:i + 600].encode()) + [256] for i in range(0, 120_000, 600)])
    flattened = ",".join(f"{w},{p}" for w, p in zip([0.25] * 3, blend["prefixes"])) + f",0.25,{foreign}"
    tokenizer = hf_dir(tmp_path / "tokenizer")  # an HF dir holding the byte tokenizer
    common = {"data.prefixes": f"[{flattened}]", "trainer.save_interval": 2, "logger": "none"}

    with pytest.raises(ConfigError, match="data.tokenizer="):
        run("pretrain", train_overrides("unused", tmp_path / "run", **common, **{"trainer.max_steps": 2}))
    first = run("pretrain", train_overrides("unused", tmp_path / "run", **common,
                                            **{"trainer.max_steps": 2, "data.tokenizer": tokenizer}))
    assert first.completed and all(np.isfinite(v) for v in first.losses.values())
    second = run("pretrain", train_overrides("unused", tmp_path / "run", **common,
                                             **{"trainer.max_steps": 3, "data.tokenizer": tokenizer, "data.token_scan": "full"}))
    assert second.start_step == 2 and sorted(second.losses) == [3]


# ---- chat data -------------------------------------------------------------------------

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
    {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "three and three"},
]}


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> str:
    return hf_dir(tmp_path_factory.mktemp("chat_tok"), TEMPLATE, CHAT_TOKENS)


def test_chat_file_gives_the_templates_text(tmp_path, chat_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n\n" + json.dumps({"messages": CONVERSATION["messages"][:2]}) + "\n")
    tok = HFTokenizer(chat_tokenizer)
    turns = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n",
             "<|im_start|>assistant\n<think>two and two</think>\n4<|im_end|>\n",
             "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>three and three</think>\n6<|im_end|>\n")
    for earlier, first_answer in (("keep", turns[1]), ("drop", "<|im_start|>assistant\n4<|im_end|>\n")):
        stats = preprocess([str(path)], tmp_path / earlier, tok, progress=False, chat=ChatOptions(chat_tokenizer, earlier))
        docs = documents_of(data_prefix(tmp_path / earlier))
        assert stats["documents"] == 2 and all(d[-1] == tok.eod for d in docs)
        texts = [tok._tok.decode(d[:-1], skip_special_tokens=False) for d in docs]
        assert texts == [turns[0] + first_answer + turns[2], turns[0]]
    # The template's markup is the tokenizer's own special tokens, one id each.
    assert docs[0].count(tok._tok.token_to_id("<think>")) == 1


def test_chat_bad_lines_refused_before_writing_or_skipped(tmp_path, chat_tokenizer):
    good = json.dumps(CONVERSATION).encode()
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join([good, b"{not json", json.dumps({"text": "hi"}).encode(), good,
                                 json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(),
                                 '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1")]) + b"\n")
    tok = HFTokenizer(chat_tokenizer)
    with pytest.raises(ConfigError) as err:
        preprocess([str(path)], tmp_path / "out", tok, progress=False, chat=ChatOptions(chat_tokenizer))
    message = err.value.allowed
    assert "4 bad lines" in message and "--on-bad-line skip" in message
    for n, why in ((2, "not JSON"), (3, "no 'messages' list"), (5, "message 0 has role 'tool'"), (6, "not UTF-8")):
        assert f"chat.jsonl:{n} {why}" in message
    assert list(tmp_path.iterdir()) == [path]  # nothing written

    stats = preprocess([str(path)], tmp_path / "out", tok, progress=False, chat=ChatOptions(chat_tokenizer), on_bad_line="skip")
    assert stats["documents"] == 2 and stats["chat"]["bad_lines_skipped"] == 4
    assert stats["chat"]["bad_line_numbers"] == [f"{path}:{n}" for n in (2, 3, 5, 6)]


def test_chat_refuses_a_tokenizer_without_a_template(tmp_path):
    plain = hf_dir(tmp_path / "plain")
    (tmp_path / "c.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    with pytest.raises(ConfigError, match="has no chat template") as err:
        preprocess([str(tmp_path / "c.jsonl")], tmp_path / "out", HFTokenizer(plain), progress=False, chat=ChatOptions(plain))
    assert err.value.key == "--tokenizer-path" and err.value.value == plain


# ---- the Slurm array job ----------------------------------------------------------------

def test_slurm_preprocess_array_dry_run(tmp_path):
    script = REPO / "slurm" / "preprocess.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    inputs = write_jsonl_files(tmp_path, 4, docs_each=2)
    preprocess(inputs, tmp_path / "web", ByteTokenizer(), progress=False, shard=(1, 2))
    proc = subprocess.run(["bash", str(script), "--dry-run", "--array=0-1", "--input", *inputs, "--output-prefix",
                           str(tmp_path / "web")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == f"shard 0/2: 2 files ({inputs[0]} ... {inputs[1]}) -> {tmp_path}/web.shard00000-of-00002_text_document [to do]"
    assert lines[2] == f"shard 1/2: 2 files ({inputs[2]} ... {inputs[3]}) -> {tmp_path}/web.shard00001-of-00002_text_document [finished]"
    assert not (tmp_path / "web.shard00000-of-00002_text_document.bin").exists()
    bad = subprocess.run(["bash", str(script), "--dry-run", "--array=1-3", "--input", *inputs], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
