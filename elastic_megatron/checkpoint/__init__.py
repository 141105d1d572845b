"""Checkpoints, in one home: the store (Megatron dist checkpoints with an atomic tracker
flip, resume), the metadata every checkpoint carries about itself (resolved config,
architecture, budgets) and its checks, the integrity manifest, and the run-directory
lock. `convert/`, `slicing/`, `elastic/` and `training/` all read checkpoints through
here; nothing here imports from them."""
