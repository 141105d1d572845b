"""What a resumed job may change, checked before anything is written to the run dir.

A checkpoint records the resolved config it was written with. Resuming compares the
job's config with it, key by key:

- settings that only steer the run from here on (step counts, intervals, batch split,
  layout, logging, cluster) may change: each change is printed;
- everything that defines what the run is (architecture, data, tokenizer, seed, elastic
  spec, precision, LR schedule) is refused by name: the run dir's weights, optimizer
  state, schedule and data position belong to those values. Start a new run from the
  checkpoint's weights (run.init_checkpoint=...) to change them.

The LR schedule is in the list because Megatron's scheduler restores its own values from
the checkpoint: a changed lr would otherwise be ignored without a word.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml
from omegaconf import OmegaConf

from elastic_megatron.config.errors import ConfigError

# Dotted keys (or key prefixes ending in '.') that may differ from the checkpoint's.
MAY_CHANGE = (
    "run.dir", "run.name", "run.init_checkpoint", "run.verify_checkpoints",
    "trainer.max_steps", "trainer.micro_batch_size", "trainer.global_batch_size", "trainer.log_interval",
    "trainer.eval_interval", "trainer.eval_iters", "trainer.save_interval", "trainer.peak_flops",
    "trainer.step_sleep_s", "trainer.clip_grad", "trainer.max_skipped_steps",
    "parallel.", "logger.", "cluster.", "data.cache_dir",
    # Which tokenizer the data have is held by the data identity (its description), not the key.
    "data.tokenizer", "data.token_scan",
    "model.backend", "model.moe_token_dispatcher", "model.max_sequence_length", "model.init",
    "elastic.init_checkpoint", "elastic.importance.plots",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def data_identity(tokenizer, fingerprints: dict[str, str], valid_fingerprints: Optional[dict[str, str]] = None) -> dict:
    """What the data of a run are, independent of where they lie: the tokenizer and the
    fingerprint of each prefix's .idx (data/indexed.py), in blend order; with
    `data.valid_prefixes`, those of the held-out validation prefixes too (None without)."""
    return {"tokenizer": tokenizer.describe(), "fingerprints": list(fingerprints.values()),
            "valid_fingerprints": list(valid_fingerprints.values()) if valid_fingerprints else None}


def _require_same_files(key: str, value, recorded: list, current: list, where: str, what: str, used: str,
                        consequence: str) -> None:
    """Refuse a resume whose `what` files (their .idx fingerprints) are not the checkpoint's."""
    if recorded != current:
        raise ConfigError(key, value, f"the {what} files are not the ones the checkpoint was {used} on ({where}): their "
                          f".idx fingerprints differ (re-made or replaced in place?); {consequence}. Restore them, or "
                          "start a new run")


def check_resume_config(job, checkpoint_meta: dict, where: str, data: dict | None = None) -> list[str]:
    """Compare `job` with the config recorded in a checkpoint's metadata; raise
    ConfigError on the first key that may not change, else return one line per change.
    A checkpoint without a recorded config (none written by this project) is refused.
    `data`: the job's `data_identity`, held against the one the checkpoint records: the
    data may move (other prefixes, same files), not change."""
    text: Optional[str] = checkpoint_meta.get("config")
    if not text:
        raise ConfigError("run.dir", str(job.run.dir), f"its checkpoint {where} records no config: it was not written by "
                          "this project's trainer; start a new run from it with run.init_checkpoint=...")
    saved = _flat(yaml.safe_load(text))
    now = _flat(OmegaConf.to_container(OmegaConf.structured(job), resolve=True))
    changes = []
    recorded = checkpoint_meta.get("data")
    same_data = same_valid = False
    if data is not None and recorded:  # checkpoints written before data identities had none
        if recorded["tokenizer"] != data["tokenizer"]:
            raise ConfigError("data.prefixes", now.get("data.prefixes"), f"the data's tokenizer {data['tokenizer']} is not the "
                              f"checkpoint's {recorded['tokenizer']} ({where}); a resumed run keeps its tokenizer")
        _require_same_files("data.prefixes", now.get("data.prefixes"), recorded["fingerprints"], data["fingerprints"], where,
                            "data", "trained", "the run's data position would point into other data")
        same_data = True
        # Held-out validation files re-made in place would splice another curve onto the
        # logged one. Only compared when both runs name validation prefixes: switching them
        # on or off is a config change, refused below by key. Older checkpoints lack the key.
        recorded_valid, valid = recorded.get("valid_fingerprints"), data.get("valid_fingerprints")
        if recorded_valid and valid:
            _require_same_files("data.valid_prefixes", now.get("data.valid_prefixes"), recorded_valid, valid, where,
                                "validation data", "validated", "its validation curve would continue on other data")
            same_valid = True
    for key in sorted(set(saved) | set(now)):
        if key not in saved or key not in now:  # a setting added or retired since the checkpoint was written
            continue
        if saved[key] == now[key]:
            continue
        if (key == "data.prefixes" and same_data) or (key == "data.valid_prefixes" and same_valid):
            changes.append(f"{key}: {saved[key]!r} -> {now[key]!r} (the same files: identical fingerprints)")
            continue
        if not _may_change(key):
            raise ConfigError(key, now[key], f"differs from the resumed checkpoint's {saved[key]!r} ({where}); a resumed run keeps "
                              "its architecture, data, seed, precision, elastic spec and LR schedule. Set it back, or start a "
                              "new run from the checkpoint's weights with run.init_checkpoint=... in another run.dir")
        changes.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return changes
