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
from elastic_megatron.data.indexed import check_indexed_dataset, index_fingerprint, meta_path, output_prefix_of
from elastic_megatron.data.tokenizer import tokenizer_from_description


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
    # Megatron splits each prefix by whole documents (GPT: by sequences, one per document
    # here); an empty split would make its sample index loop forever, so refuse it here.
    bounds = np.cumsum([0.0] + parts) / sum(parts)
    if spec.valid_prefixes:
        return  # the split is not used: training reads its prefixes whole
    for prefix in spec.prefixes:
        n = sequences[prefix]
        for name, i in (("train", 0), ("valid", 1)):
            if round(bounds[i + 1] * n) - round(bounds[i] * n) < 1:
                raise ConfigError("data.split", spec.split, f"leaves the {name} split of {prefix} ({n} documents) empty; use more data or a larger {name} share")


def load_tokenizer_for(prefixes: list[str]):
    """Rebuild the tokenizer preprocessing used, from `<output prefix>.tokenizer.meta.json`."""
    descriptions = []
    for prefix in prefixes:
        path = meta_path(output_prefix_of(prefix))
        if not path.is_file():
            raise ConfigError("data.prefixes", prefix, f"no tokenizer description {path}; re-run tools/preprocess_data.py")
        descriptions.append(json.loads(path.read_text())["tokenizer"])
    if any(d != descriptions[0] for d in descriptions):
        raise ConfigError("data.prefixes", list(prefixes), f"all prefixes (training and validation) need one tokenizer; found {descriptions}")
    return tokenizer_from_description(descriptions[0])


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
                    valid_prefixes=d.get("valid_prefixes"))
    validate_data_spec(spec)
    n = num_batches * micro_batch_size
    train, valid = build_datasets(spec, load_tokenizer_for(spec.prefixes), train_samples=n if split == "train" else micro_batch_size,
                                  valid_samples=n if split == "valid" else micro_batch_size)
    loader = make_loader(train if split == "train" else valid, 0, micro_batch_size, parallel_state.get_data_parallel_rank(), 1)
    return [next(loader) for _ in range(num_batches)]
