"""Stand in for any rank of a large job inside this one process, and check that the ranks'
checkpoint shards tile every global tensor.

`simulated_rank(parallel, world_size, rank)` initialises torch.distributed with torch's
`fake` backend (a process group of `world_size` ranks of which this process is `rank`;
it creates every subgroup but communicates nothing) and Megatron-Core's parallel state
over it, exactly as `initialize_model_parallel` does on a real job, without Megatron's
extra gloo groups (the fake backend has no gloo twin; nothing here needs them). Whatever
is built inside the block (on the meta device) is that rank's part of the model: its
modules, its TP/EP shards, its pipeline stage, its checkpoint keys and replica ids.
One rank at a time, so 64 simulated ranks cost 64 builds in one process, not 64
processes; nothing that needs a collective's result may run inside (the fake backend
returns garbage).

`shards(sharded_state_dict)` lists what a dist-checkpoint save of that rank would write
(Megatron's factories applied, as the save does), and `check_tiling` holds the ranks'
shards to what a checkpoint needs: one global shape and dtype per key, every shard
inside its tensor, the main replicas (replica id 0) covering every element exactly once,
and every other replica a copy of a main one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterator

import torch.distributed as dist


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in a layout (Megatron's parallel-state ranks)."""

    rank: int
    pp: int
    tp: int
    cp: int
    ep: int
    etp: int
    dp: int  # data-parallel rank (without CP)
    edp: int  # expert-data-parallel rank
    dp_size: int  # data-parallel size (without CP)
    dp_cp_size: int  # ranks that hold replicas of the dense weights (DP x CP)
    edp_size: int  # ranks that hold replicas of the expert weights

    def shard_class(self) -> tuple[int, ...]:
        """Ranks with equal classes build identical modules and shards (only replica ids
        differ): data-parallel replicas."""
        return self.pp, self.tp, self.cp, self.ep, self.etp

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"pp {self.pp}, tp {self.tp}, cp {self.cp}, ep {self.ep}, etp {self.etp}, dp {self.dp}"


def _coords(rank: int) -> RankCoords:
    from megatron.core import parallel_state as ps

    return RankCoords(
        rank=rank, pp=ps.get_pipeline_model_parallel_rank(), tp=ps.get_tensor_model_parallel_rank(),
        cp=ps.get_context_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_rank(), dp=ps.get_data_parallel_rank(),
        edp=ps.get_expert_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        dp_cp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
        edp_size=ps.get_expert_data_parallel_world_size(),
    )


@contextlib.contextmanager
def simulated_rank(parallel, world_size: int, rank: int) -> Iterator[RankCoords]:
    """This process is `rank` of a `world_size`-rank job laid out as `parallel` (tp, pp,
    ep, etp, cp) for the duration of the block. Refuses to replace a real process group."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        raise RuntimeError("simulated_rank needs a process without a torch.distributed process group")
    hook = sys.excepthook  # init_process_group prefixes tracebacks with "[rank<r>]:" for good; undone below
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
            expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.etp,
            context_parallel_size=parallel.cp, create_gloo_process_groups=False,
        )
        yield _coords(rank)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
        sys.excepthook = hook


def layout_coords(parallel, world_size: int) -> list[RankCoords]:
    """Every rank's coordinates under `parallel` (Megatron's own rank assignment)."""
    out = []
    for rank in range(world_size):
        with simulated_rank(parallel, world_size, rank) as coords:
            out.append(coords)
    return out


def representative_ranks(coords: list[RankCoords]) -> dict[int, list[int]]:
    """{the lowest rank of each shard class: every rank of its class}: the fewest ranks
    whose builds show every distinct module and shard of the layout."""
    classes: dict[tuple, list[int]] = defaultdict(list)
    for c in coords:
        classes[c.shard_class()].append(c.rank)
    return {ranks[0]: ranks for ranks in sorted(classes.values())}


@dataclass(frozen=True)
class Shard:
    """One entry of a rank's dist-checkpoint state: a tensor shard or an object."""

    key: str  # the checkpoint key
    name: str  # where it sits in the rank's state dict (the module's parameter name)
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    replica_id: tuple[int, ...]
    dtype: str  # "object" for a ShardedObject
    flattened: bool = False  # a flattened range of the local box (Megatron's distributed optimizer)

    @property
    def main(self) -> bool:
        return not any(self.replica_id)

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Shard":
        return Shard(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _as_tuple(x) -> tuple[int, ...]:
    return tuple(int(v) for v in x) if isinstance(x, (tuple, list)) else (int(x),)


def _walk(x, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, leaf) of a nested state dict."""
    for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            yield from _walk(v, path)
        else:
            yield path, v


def shards(sharded_state_dict: dict) -> list[Shard]:
    """What a save of this state would write, one entry per ShardedTensor/ShardedObject
    (factories built as the save builds them; the state dict is left as it was). An
    entry's `name` is its path in the state dict (a parameter's name for the model)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    out = []
    for name, value in _walk(sharded_state_dict):
        built = value.build() if isinstance(value, ShardedTensorFactory) else value
        for _, sh in _walk(built) if isinstance(built, (dict, list)) else [("", built)]:
            if isinstance(sh, ShardedTensor):  # prepended axes (stacked experts) hold one entry of the shard
                local = (1,) * sh.prepend_axis_num + _as_tuple(sh.local_shape)
                out.append(Shard(sh.key, name, _as_tuple(sh.global_shape), _as_tuple(sh.global_offset), local,
                                 _as_tuple(sh.replica_id),
                                 str(sh.dtype).removeprefix("torch."), sh.flattened_range is not None))
            elif isinstance(sh, ShardedObject):
                n = len(_as_tuple(sh.global_shape))
                out.append(Shard(sh.key, name, _as_tuple(sh.global_shape), _as_tuple(sh.global_offset), (1,) * n,
                                 _as_tuple(sh.replica_id), "object"))
    return out


def _cells(boundaries: list[list[int]]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offset, shape) of every cell of the grid the boundaries cut."""
    for pairs in itertools.product(*[list(zip(b[:-1], b[1:])) for b in boundaries]):
        yield tuple(lo for lo, _ in pairs), tuple(hi - lo for lo, hi in pairs)


def _where(shard: Shard) -> str:
    return f"offset {shard.offset} shape {shard.local_shape}"


def check_tiling(by_rank: dict[int, list[Shard]], complete: bool = True, limit: int = 3) -> list[str]:
    """Failures (one line each, naming rank, module and key) of the shards `by_rank`
    against a checkpoint's needs (module doc). `complete`: every rank of the world is in
    `by_rank`, so replica ids must also be distinct among a shard's holders. At most
    `limit` lines per key and problem."""
    failures: list[str] = []
    per_key: dict[str, list[tuple[int, Shard]]] = defaultdict(list)
    for rank, entries in by_rank.items():
        seen: dict[tuple, Shard] = {}
        for s in entries:
            per_key[s.key].append((rank, s))
            ident = (s.key, s.offset, s.replica_id)
            if ident in seen:
                failures.append(f"rank {rank}: {s.name} and {seen[ident].name} write the same shard of key {s.key} "
                                f"({_where(s)}, replica {s.replica_id})")
            seen[ident] = s
    for key, held in sorted(per_key.items()):
        failures += _check_key(key, held, complete, limit)
    return failures


def _check_key(key: str, held: list[tuple[int, Shard]], complete: bool, limit: int) -> list[str]:
    out: list[str] = []
    first_rank, first = held[0]
    for rank, s in held[1:]:
        if s.global_shape != first.global_shape or s.dtype != first.dtype:
            out.append(f"rank {rank}: {s.name}: key {key} has global shape {s.global_shape} ({s.dtype}), rank "
                       f"{first_rank}'s {first.name} has {first.global_shape} ({first.dtype})")
            return out[:limit]
    shape = first.global_shape
    for rank, s in held:
        if s.flattened:
            out.append(f"rank {rank}: {s.name}: key {key} is a flattened range; this check covers whole boxes only")
            return out[:limit]
        if len(s.offset) != len(shape) or len(s.local_shape) != len(shape) or not all(
                0 <= o and o + n <= g for o, n, g in zip(s.offset, s.local_shape, shape)):
            out.append(f"rank {rank}: {s.name}: key {key} shard {_where(s)} lies outside the global shape {shape}")
    if out:
        return out[:limit]
    mains = [(r, s) for r, s in held if s.main]
    boundaries = [sorted({0, g} | {s.offset[d] for _, s in held} | {s.offset[d] + s.local_shape[d] for _, s in held})
                  for d, g in enumerate(shape)]
    covered: dict[tuple, list] = defaultdict(list)  # cell offset -> the main replicas that hold it
    for r, s in mains:
        spans = [b[b.index(o):b.index(o + n)] for b, o, n in zip(boundaries, s.offset, s.local_shape)]
        for offset in itertools.product(*spans):
            covered[offset].append((r, s))
    gaps, overlaps = [], []
    for offset, cell in _cells(boundaries):
        owners = covered.get(offset, [])
        if not owners and all(cell):
            gaps.append(f"key {key} ({first.name}): the block at offset {offset}, shape {cell} is held by no "
                        "simulated rank as the main replica (replica id 0): a save would leave it out")
        elif len(owners) > 1:
            who = ", ".join(f"rank {r} ({s.name}, {_where(s)})" for r, s in owners)
            overlaps.append(f"key {key}: the block at offset {offset}, shape {cell} is the main replica on "
                            f"{len(owners)} ranks: {who}")
    out += gaps[:limit] + overlaps[:limit]
    main_boxes = {(s.offset, s.local_shape) for _, s in mains}
    copies = defaultdict(list)
    for r, s in held:
        if not s.main and (s.offset, s.local_shape) not in main_boxes:
            out.append(f"rank {r}: {s.name}: key {key} replica {s.replica_id} of {_where(s)} has no main replica "
                       "with that box")
        if not s.main:
            copies[(s.offset, s.local_shape, s.replica_id)].append((r, s))
    if complete:
        for (offset, local, replica), owners in copies.items():
            if len(owners) > 1:
                ranks = ", ".join(str(r) for r, _ in owners)
                out.append(f"key {key}: ranks {ranks} ({owners[0][1].name}) all write {(offset, local)} as replica "
                           f"{replica}: a save would write it {len(owners)} times")
    return out[:limit * 3]
