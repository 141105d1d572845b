"""Train/valid datasets through megatron-core (`BlendedMegatronDatasetBuilder`, `GPTDataset`)
and a resumable data-parallel loader.

A blend is several data prefixes with weights; `split` cuts each into train/valid/test
document ranges, unless `valid_prefixes` names held-out data for validation (Megatron's
separate train/valid paths: then the training prefixes are used whole). Megatron shuffles
with the seed and caches its sample index under `cache_dir`. `heldout_dataset` reads any
prefix whole, the same way, for evaluation (jobs/evaluate.py). `validate_data_spec` checks every `.bin`/`.idx` pair before anything reads it
(`indexed.check_indexed_dataset`), and the cache key carries a fingerprint of each
prefix's `.idx`, so data re-made in place rebuild their indices instead of reusing stale
ones. `make_loader` follows Megatron's pretraining sampler: global batches are
consecutive runs of the shuffled sample order, each data-parallel rank takes its slice of
every global micro-batch, and starting from `consumed_samples` resumes exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import split_blend
from elastic_megatron.data.indexed import check_indexed_dataset, check_token_ids, index_fingerprint, meta_path, output_prefix_of
from elastic_megatron.data.tokenizer import named_tokenizer, same_tokenizer, tokenizer_from_description


@dataclass
class DataSpec:
    prefixes: list[str]
    weights: Optional[list[float]]
    split: str
    seq_length: int
    seed: int
    cache_dir: str
    # Held-out validation data (whole prefixes); None = the `split`'s valid share of `prefixes`.
    valid_prefixes: Optional[list[str]] = None
    # data.tokenizer (data without our tokenizer record) and data.token_scan.
    tokenizer: Optional[str] = None
    token_scan: str = "sample"

    def __post_init__(self):
        # Megatron's flattened [w1, p1, w2, p2] blend becomes prefixes + weights.
        self.prefixes, self.weights = split_blend(self.prefixes, self.weights)


def require_prefix(prefix: str, key: str) -> int:
    """The number of sequences of the indexed dataset `prefix`; ConfigError naming `key`
    when its .bin/.idx pair is missing or does not check."""
    missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
    if missing:
        out = output_prefix_of(prefix)
        raise ConfigError(
            key, prefix,
            f"no {prefix}{'/'.join(missing)} found; make it with "
            f"python tools/preprocess_data.py --input <files> --output-prefix {out}",
        )
    return check_indexed_dataset(prefix).sequences


def validate_data_spec(spec: DataSpec) -> None:
    sequences = {}
    for prefix in spec.prefixes:
        if prefix not in sequences:
            sequences[prefix] = require_prefix(prefix, "data.prefixes")
    for prefix in spec.valid_prefixes or []:
        require_prefix(prefix, "data.valid_prefixes")
    if spec.valid_prefixes is not None and not spec.valid_prefixes:
        raise ConfigError("data.valid_prefixes", [], "give at least one prefix, or null to validate on the split's valid share")
    if spec.weights is not None:
        if len(spec.weights) != len(spec.prefixes):
            raise ConfigError("data.weights", list(spec.weights), f"needs one weight per prefix ({len(spec.prefixes)})")
        if any(w < 0 for w in spec.weights) or sum(spec.weights) <= 0:
            raise ConfigError("data.weights", list(spec.weights), "weights must be >= 0 with a positive sum")
    try:
        parts = [float(x) for x in spec.split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0 or parts[1] <= 0:
        raise ConfigError("data.split", spec.split, "three comma-separated proportions train,valid,test with train and valid > 0, e.g. '98,2,0'")
    if spec.valid_prefixes:
        return  # the split is not used: training reads its prefixes whole
    for prefix in spec.prefixes:
        check_split(spec.split, prefix, sequences[prefix])


def check_split(split: str, prefix: str, n: int) -> None:
    """A valid `split` (checked above) leaves the train and valid splits of `prefix`, `n`
    documents, non-empty: Megatron splits each prefix by whole documents (GPT: by sequences,
    one per document here); an empty split would make its sample index loop forever. Also
    for a prefix about to be written (benchmarks/fidelity.py checks its text with it)."""
    parts = [float(x) for x in split.split(",")]
    bounds = np.cumsum([0.0] + parts) / sum(parts)
    for name, i in (("train", 0), ("valid", 1)):
        if round(bounds[i + 1] * n) - round(bounds[i] * n) < 1:
            raise ConfigError("data.split", split, f"leaves the {name} split of {prefix} ({n} documents) empty; use more data or a larger {name} share")


def load_tokenizer_for(prefixes: list[str], tokenizer: Optional[str] = None, token_scan: str = "sample"):
    """The tokenizer of `prefixes`: rebuilt from `<output prefix>.tokenizer.meta.json`
    (what tools/preprocess_data.py records), or the one `tokenizer` names (data.tokenizer)
    for data without that record, e.g. Megatron-LM's; then the ids of their .bin are
    checked against its vocabulary (`check_token_ids`: a sample, or all with
    token_scan='full'). A named tokenizer must also be the one recorded beside the others."""
    named = named_tokenizer(tokenizer) if tokenizer else None
    descriptions, foreign = [], []
    for prefix in dict.fromkeys(prefixes):
        path = meta_path(output_prefix_of(prefix))
        if path.is_file():
            recorded = json.loads(path.read_text())["tokenizer"]
            if named is not None and not same_tokenizer(named.describe(), recorded):
                raise ConfigError("data.tokenizer", tokenizer, f"is not the tokenizer {prefix} was made with ({path} "
                                  f"records {recorded}); all prefixes need one tokenizer")
            descriptions.append(recorded)
        elif named is None:
            raise ConfigError("data.prefixes", prefix, f"has no tokenizer record {path} (data tokenized elsewhere, e.g. by "
                              "Megatron-LM's tools/preprocess_data.py, have none): name their tokenizer with "
                              "data.tokenizer=<HF tokenizer dir, tokenizer.json or 'byte'>, or make the data with "
                              "this project's tools/preprocess_data.py")
        else:
            foreign.append(prefix)
    if named is not None:
        for prefix in foreign:
            check_token_ids(prefix, named.vocab_size, tokenizer, full=token_scan == "full")
        return named
    if any(d != descriptions[0] for d in descriptions):
        raise ConfigError("data.prefixes", list(prefixes), f"all prefixes (training and validation) need one tokenizer; found {descriptions}")
    return tokenizer_from_description(descriptions[0])


def spec_tokenizer(spec: DataSpec):
    """The one tokenizer of a DataSpec's training and validation prefixes (load_tokenizer_for)."""
    return load_tokenizer_for(spec.prefixes + (spec.valid_prefixes or []), spec.tokenizer, spec.token_scan)


class _MegatronTokenizerView:
    """What GPTDataset reads from a tokenizer: vocab size, eod, pad and an identity.

    The identity (`unique_identifiers`) is how our data enter Megatron's cache keys:
    every MegatronDataset hashes its `unique_description`, a JSON of its class, path,
    sample count, split and `config.tokenizer` (serialised through this attribute) into
    the names of its cached index files; a BlendedDataset hashes its datasets'
    identifiers the same way. Carrying each prefix's `.idx` fingerprint here therefore
    renames the GPTDataset and the BlendedDataset caches when the data change, without
    touching Megatron.
    """

    def __init__(self, tokenizer, data_fingerprints: Optional[dict] = None):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        # Padding only fills labels past the end of a sequence (masked out): use a distinct id.
        self.pad = -1
        self.unique_identifiers = {"tokenizer": tokenizer.describe(), "data": dict(data_fingerprints or {})}


def data_fingerprints(prefixes: list[str]) -> dict:
    """`{prefix: fingerprint of its .idx}` for the cache key (see `index_fingerprint`)."""
    return {prefix: index_fingerprint(prefix) for prefix in dict.fromkeys(prefixes)}


def _gpt_datasets(spec: DataSpec, tokenizer, sizes: list, blend=None, blend_per_split=None):
    """Megatron's (train, valid, test) GPTDatasets of `sizes` samples (None: one epoch)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    Path(spec.cache_dir).mkdir(parents=True, exist_ok=True)
    every = list(spec.prefixes) + list(spec.valid_prefixes or [])
    config = GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=spec.split if blend is not None else None,
        path_to_cache=spec.cache_dir,
        # The data fingerprints put the content of every prefix into the cache keys: data
        # re-made in place get new cache files; unchanged data find theirs. One
        # tokenizer view serves the whole blend, so a re-made prefix also renames the
        # caches of the other prefixes in the same blend (cheap to rebuild; never stale).
        tokenizer=_MegatronTokenizerView(tokenizer, data_fingerprints(every)),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def build_datasets(spec: DataSpec, tokenizer, train_samples: int, valid_samples: int):
    """(train, valid) GPTDatasets with at least the requested number of samples."""
    train_blend = (list(spec.prefixes), list(spec.weights) if spec.weights else None)
    if spec.valid_prefixes:
        train, valid, _ = _gpt_datasets(spec, tokenizer, [train_samples, valid_samples, 0],
                                        blend_per_split=[train_blend, (list(spec.valid_prefixes), None), None])
    else:
        train, valid, _ = _gpt_datasets(spec, tokenizer, [train_samples, valid_samples, 0], blend=train_blend)
    return train, valid


def heldout_dataset(prefix: str, tokenizer, seq_length: int, seed: int, cache_dir: str, num_samples: Optional[int] = None):
    """The whole of `prefix` as validation data, cut and shuffled exactly as training's
    validation reads `data.valid_prefixes: [prefix]` with the same seed and sequence
    length; `num_samples` None = one pass over the data."""
    spec = DataSpec(prefixes=[], weights=None, split="", seq_length=seq_length, seed=seed, cache_dir=cache_dir,
                    valid_prefixes=[prefix])
    return _gpt_datasets(spec, tokenizer, [0, num_samples, 0], blend_per_split=[None, ([prefix], None), None])[1]


def make_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Endless micro-batches for this DP rank, starting after `consumed_samples` global samples."""
    n = len(dataset)
    index = consumed_samples
    while True:
        start = index + dp_rank * micro_batch_size
        items = [dataset[(start + k) % n] for k in range(micro_batch_size)]
        yield {
            key: torch.stack([torch.as_tensor(item[key]) for item in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        index += micro_batch_size * dp_size


def read_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset (small datasets: tests and reports)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))])


def recorded_batches(job: dict, num_batches: int, micro_batch_size: int, split: str = "valid") -> list[dict]:
    """`num_batches` micro-batches of the data a run was trained on (`job`: the resolved
    config its checkpoints record), from the start of its `split` (train or valid):
    evaluation reads the validation split, calibration the training split."""
    from megatron.core import parallel_state

    d = job["data"]
    spec = DataSpec(prefixes=list(d["prefixes"]), weights=d["weights"], split=d["split"], seq_length=d["seq_length"],
                    seed=job["run"]["seed"], cache_dir=d["cache_dir"] or str(Path(job["run"]["dir"]) / "data_cache"),
                    valid_prefixes=d.get("valid_prefixes"), tokenizer=d.get("tokenizer"),
                    token_scan=d.get("token_scan") or "sample")
    validate_data_spec(spec)
    n = num_batches * micro_batch_size
    train, valid = build_datasets(spec, spec_tokenizer(spec), train_samples=n if split == "train" else micro_batch_size,
                                  valid_samples=n if split == "valid" else micro_batch_size)
    loader = make_loader(train if split == "train" else valid, 0, micro_batch_size, parallel_state.get_data_parallel_rank(), 1)
    return [next(loader) for _ in range(num_batches)]
