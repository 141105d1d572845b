"""Stream our Megatron dist checkpoints (torch_dist) tensor by tensor, both ways.

Two namings meet here:
- the *flat* naming: the local backend's `model.state_dict()` names (one tensor per
  parameter, experts as `mlp.experts.local_experts.{e}.*`); re-indexing (elastic/reindex)
  and the HF adapters speak it;
- the *dist-checkpoint* naming Megatron writes: TE-fused norm names, Mamba's in_proj
  split into z/x/B/C/dt and conv1d into x/B/C, experts stacked along a leading axis,
  one `_extra_state` object per linear module.

`LAYOUT` below is the one table between them. `DistCheckpointSource` reads a checkpoint
through it one key at a time (torch.distributed.checkpoint, no process group, no model);
`write_dist_checkpoint` writes one through it with a lazy save planner, so each tensor
is produced only when the writer reaches it. The result loads with Megatron's own
`dist_checkpointing.load` into a model of the same config, at any parallel layout
(global shapes), like a checkpoint the trainer saved.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.convert.tensors import TensorSource
from elastic_megatron.checkpoint import store
from elastic_megatron.checkpoint.manifest import write_manifest
from elastic_megatron.checkpoint.metadata import checkpoint_model_config
from elastic_megatron.checkpoint.verify import check_shard_files

_METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}

# Megatron's fused-norm names for each layer type's pre-norm (local name -> dist name).
_NORM_KEYS = {
    MAMBA: ("norm.weight", "mixer.in_proj.layer_norm_weight"),
    ATTENTION: ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    MLP: ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    MOE: ("pre_mlp_layernorm.weight", "pre_mlp_layernorm.weight"),
}
_LINEARS = {
    MAMBA: ("mixer.in_proj", "mixer.out_proj"),
    ATTENTION: ("self_attention.linear_qkv", "self_attention.linear_proj"),
    MLP: ("mlp.linear_fc1", "mlp.linear_fc2"),
    MOE: ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"),
}
_PLAIN = {
    MAMBA: ("mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"),
    ATTENTION: ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"),
    MLP: ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight"),
    MOE: ("mlp.router.weight", "mlp.router.expert_bias"),
}


class Part:
    """A dist key that holds rows [lo, hi) of a flat tensor (whole tensor: lo=hi=None),
    or, for stacked experts, the flat tensors of every expert."""

    def __init__(self, key: str, flat: str, lo: Optional[int] = None, hi: Optional[int] = None,
                 experts: Optional[list[str]] = None, expert: Optional[int] = None):
        self.key, self.flat, self.lo, self.hi = key, flat, lo, hi
        self.experts = experts  # a stacked key: the flat names of its experts, in order
        self.expert = expert  # one expert's slice of a stacked key


def layout(cfg: ModelConfig) -> tuple[list[Part], list[str]]:
    """Dist-checkpoint tensor keys of a model of `cfg` (with where their data lives in the
    flat naming) and its `_extra_state` object keys."""
    parts: list[Part] = [Part("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")]
    objects: list[str] = []
    di, gd, nh = cfg.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim, cfg.mamba_num_heads
    for i, symbol in enumerate(cfg.hybrid_pattern):
        p = f"decoder.layers.{i}."
        local_norm, dist_norm = _NORM_KEYS[symbol]
        parts.append(Part(p + dist_norm, p + local_norm))
        for rest in _PLAIN[symbol]:
            if rest == "mlp.router.expert_bias" and not cfg.moe_router_enable_expert_bias:
                continue
            parts.append(Part(p + rest, p + rest))
        if symbol == MAMBA:
            for name, lo, hi in (("z", 0, di), ("x", di, 2 * di), ("B", 2 * di, 2 * di + gd),
                                 ("C", 2 * di + gd, 2 * di + 2 * gd), ("dt", 2 * di + 2 * gd, 2 * di + 2 * gd + nh)):
                parts.append(Part(f"{p}mixer.in_proj.weight.{name}", p + "mixer.in_proj.weight", lo, hi))
            for what in ("weight", "bias"):
                for name, lo, hi in (("x", 0, di), ("B", di, di + gd), ("C", di + gd, di + 2 * gd)):
                    parts.append(Part(f"{p}mixer.conv1d.{what}.{name}", f"{p}mixer.conv1d.{what}", lo, hi))
        linears = list(_LINEARS[symbol])
        if symbol == MOE:
            if not cfg.moe_shared_expert_ffn_hidden_size:
                linears = []
            else:
                for rest in ("mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"):
                    parts.append(Part(p + rest, p + rest))
            e = cfg.moe_num_experts
            for fc in ("linear_fc1", "linear_fc2"):
                parts.append(Part(f"{p}mlp.experts.experts.{fc}.weight", "", experts=[
                    f"{p}mlp.experts.local_experts.{k}.{fc}.weight" for k in range(e)]))
                objects += [f"{p}mlp.experts.experts.{fc}._extra_state/shard_{k}_{e}" for k in range(e)]
        objects += [f"{p}{m}._extra_state/shard_0_1" for m in linears]
    parts += [Part("decoder.final_norm.weight", "decoder.final_norm.weight"), Part("output_layer.weight", "output_layer.weight")]
    objects.append("output_layer._extra_state/shard_0_1")
    return parts, objects


def _rows(t: torch.Tensor, lo, hi) -> torch.Tensor:
    return t if lo is None else t[lo:hi]


class DistCheckpointSource(TensorSource):
    """The model tensors of one of our dist checkpoints (run dir or iter_* dir), in the
    flat naming, read one dist key (or one expert's chunk) at a time. A stacked expert
    key stored in one chunk is read whole and kept for that layer's other experts."""

    def __init__(self, path: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = store.open_checkpoint(path)
        self.cfg, self.meta = checkpoint_model_config(self.dir)
        self.reader = FileSystemReader(str(self.dir))
        metadata = self.reader.read_metadata()
        check_shard_files(self.dir, metadata)
        stored = metadata.state_dict_metadata
        parts, _ = layout(self.cfg)
        missing = [p.key for p in parts if p.key not in stored]
        if missing:
            raise ConfigError("checkpoint", str(self.dir), f"lacks {len(missing)} tensors of its own model config, e.g. {missing[0]!r} (incomplete or not a model checkpoint)")
        self.stored = {p.key: stored[p.key] for p in parts}
        self.sources: dict[str, list[Part]] = {}
        for p in parts:
            if p.experts:
                for k, name in enumerate(p.experts):
                    self.sources[name] = [Part(p.key, name, expert=k)]
            else:
                self.sources.setdefault(p.flat, []).append(p)
        # (stacked key, expert) -> where that expert's chunk lies, when stored per expert.
        self.chunks = {}
        for index, info in (metadata.storage_data or {}).items():
            if index.fqn in self.stored and ".mlp.experts.experts." in index.fqn and index.offset is not None:
                md = self.stored[index.fqn]
                one_expert = [c for c in md.chunks if list(c.offsets) == list(index.offset)]
                # Whole experts only: under expert tensor parallelism a chunk is part of one.
                if (one_expert and one_expert[0].sizes[0] == 1 and all(o == 0 for o in index.offset[1:])
                        and list(one_expert[0].sizes[1:]) == list(md.size[1:])):
                    self.chunks[(index.fqn, int(index.offset[0]))] = info
        self._cache: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def names(self) -> list[str]:
        return list(self.sources)

    def _load_chunk(self, key: str, expert: int) -> Optional[torch.Tensor]:
        """One expert's chunk of a stacked key, read alone from its shard file (Megatron
        and our writer store one chunk per expert); None if stored otherwise."""
        info = self.chunks.get((key, expert))
        if info is None or info.transform_descriptors:
            return None
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError("checkpoint", str(self.dir), f"expert {expert} of {key!r} cannot be read (corrupt shard?): {err}") from None
        return t[0]

    def _load(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        if self._cache[0] == key:
            return self._cache[1]
        md = self.stored[key]
        out = {key: torch.empty(md.size, dtype=md.properties.dtype)}
        try:
            dcp.load(out, storage_reader=self.reader, no_dist=True)
        except BaseException as err:  # DCP wraps read errors in a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise ConfigError("checkpoint", str(self.dir), f"tensor {key!r} cannot be read (corrupt shard?): {str(err).splitlines()[-1]}") from None
        if ".mlp.experts.experts." in key:
            self._cache = (key, out[key])
        return out[key]

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        parts = self.sources[name]
        pieces = []
        for p in parts:
            md = self.stored[p.key]
            if meta:
                t = torch.empty(md.size, dtype=md.properties.dtype, device="meta")
            elif p.expert is not None and (chunk := self._load_chunk(p.key, p.expert)) is not None:
                pieces.append(chunk)
                continue
            else:
                t = self._load(p.key)
            # A split key already holds just its rows of the flat tensor.
            pieces.append(t[p.expert] if p.expert is not None else t)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def write_dist_checkpoint(run_dir: str | Path, cfg: ModelConfig, flat: TensorSource, meta: dict, step: int = 0) -> Path:
    """Write `flat` (a source in the flat naming for a model of `cfg`) as a complete
    checkpoint of run dir `run_dir`: checkpoints/iter_<step>/ plus the tracker. Tensors
    are produced one dist key at a time, while the writer streams them to disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    parts, objects = layout(cfg)
    missing = sorted({n for p in parts for n in (p.experts or [p.flat])} - set(flat.names()))
    if missing:
        raise ConfigError("source", f"{len(missing)} tensors", f"are missing for model {cfg.name!r}, e.g. {missing[0]!r}")
    producers: dict[str, Callable[[bool], torch.Tensor]] = {}
    state: dict[str, object] = {}
    experts: dict[str, list[str]] = {}
    for p in parts:
        if p.experts:
            # Stacked [experts, ...], written one expert per chunk (as Megatron does), so
            # neither writing nor reading ever holds a whole stack.
            experts[p.key] = p.experts
            first = flat.spec(p.experts[0])
            state[p.key] = torch.empty((len(p.experts), *first.shape), dtype=first.dtype, device="meta")
        else:
            producers[p.key] = (lambda p: lambda meta: _rows(flat._get(p.flat, meta), p.lo, p.hi).contiguous())(p)
            state[p.key] = producers[p.key](True)
    for key in objects:
        # What Megatron stores for a local linear's (empty) extra state: the list of the
        # key's objects on this rank; the planner serialises it.
        state[key] = [None]

    final = store.iteration_dir(run_dir, step)
    final.mkdir(parents=True, exist_ok=False)
    # One file per tensor (or expert chunk): torch's FileSystemWriter keeps every tensor
    # of a file in memory until that file is closed (torch 2.13), so one file per rank
    # would hold the whole model.
    planner = _lazy_planner_class()(producers, experts, flat)
    dcp.save(state, storage_writer=_reproducible_writer(FileSystemWriter)(str(final), thread_count=1, single_file_per_rank=False),
             planner=planner, no_dist=True)
    planner.bar.close()
    torch.save({"step": step, "consumed_samples": 0, "format_version": store.FORMAT_VERSION,
                "meta": meta, "extra": {}}, final / "common.pt")
    (final / "metadata.json").write_text(json.dumps(_METADATA_JSON))
    write_manifest(final)
    (store.checkpoint_root(run_dir) / store.TRACKER).write_text(f"{step}\n")
    return final


def _reproducible_writer(base):
    """torch's FileSystemWriter records the directory it wrote to (here a hidden staging
    directory with a pid) and a random save id in the checkpoint's .metadata; nothing reads
    them back. Without them the same source gives the same bytes on every run, under every
    Megatron-Core version (tests/test_versions.py), and no path of the writing machine."""

    class ReproducibleWriter(base):
        def storage_meta(self):
            return None

    return ReproducibleWriter


def _lazy_planner_class():
    import dataclasses

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from tqdm import tqdm
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class LazySavePlanner(DefaultSavePlanner):
        """Plans from meta tensors; produces each tensor (or expert chunk) only when the
        writer asks for it."""

        def __init__(self, producers, experts, flat):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.producers, self.experts, self.flat = producers, experts, flat

        def create_local_plan(self):
            plan = super().create_local_plan()
            items = []
            for item in plan.items:
                names = self.experts.get(item.index.fqn)
                if names is None:
                    items.append(item)
                    continue
                size = item.tensor_data.size
                for e in range(len(names)):
                    offsets = torch.Size([e] + [0] * (len(size) - 1))
                    chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([1, *size[1:]]))
                    items.append(WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                                           tensor_data=TensorWriteData(chunk=chunk, properties=item.tensor_data.properties, size=size)))
            self.plan = dataclasses.replace(plan, items=items)
            self.bar = tqdm(total=sum(i.type != WriteItemType.BYTE_IO for i in items), desc="writing dist checkpoint", unit="tensor")
            return self.plan

        def resolve_data(self, write_item):
            fqn = write_item.index.fqn
            if write_item.type != WriteItemType.BYTE_IO:
                self.bar.update(1)
            if fqn in self.experts:
                return self.flat.get(self.experts[fqn][write_item.index.offset[0]]).unsqueeze(0).contiguous()
            if fqn in self.producers:
                return self.producers[fqn](False)
            return super().resolve_data(write_item)

    return LazySavePlanner


def config_yaml(cfg: ModelConfig, **extra) -> str:
    """The `config` text of a checkpoint's meta for a checkpoint this module writes (the
    model section is what every reader needs)."""
    return yaml.safe_dump({"model": asdict(cfg), **extra}, sort_keys=False)


def write_model_recipe(run_dir: str | Path, cfg: ModelConfig) -> Path:
    """`<run_dir>/recipes/model/<name>.yaml`: the model config as a Hydra recipe, so
    `hydra.searchpath=[file://<run_dir>/recipes] model=<name>` trains this model."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name):
        raise ConfigError("model.name", cfg.name, "must use only letters, digits, '_', '.', '-' (it names a recipe file)")
    path = Path(run_dir) / "recipes" / "model" / f"{cfg.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# The model of the checkpoint in this directory (written with it).\n"
                    + yaml.safe_dump(asdict(cfg), sort_keys=False))
    return path
