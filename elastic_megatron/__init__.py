"""elastic_megatron: Star Elastic on Megatron-Core (see README.md)."""

import warnings

# Megatron-Core warns once per module, at import, that Transformer Engine / Apex are
# missing (five lines per run). On CPU that is the expected set-up; on a GPU without TE
# `models.compat.apply` prints one short note instead.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Apex is not installed.*", category=UserWarning)
# Upstream deprecations of code paths Megatron-Core itself takes on every checkpoint save
# and load (its torch_dist strategy uses torch's ShardedTensor); nothing a user of this
# project can act on.
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor", category=FutureWarning)
# Megatron-Core 0.19 (hyper_comm_grid.py) warns at import that absl-py is missing and falls
# back to the standard logging module, which is what this project uses anyway.
warnings.filterwarnings("ignore", message=r"absl\.logging is not installed", category=UserWarning)


def _drop_log_record(logger: str, prefix: str) -> None:
    """Drop the records of `logger` whose message starts with `prefix` (nothing else)."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    logging.getLogger(logger).addFilter(_Drop())


# A CUDA build of torch on a machine without a GPU (Python 3.12 wheels are CUDA builds) logs
# 'No CUDA runtime is found, using CUDA_HOME=...' when anything imports
# torch.utils.cpp_extension (Megatron-Core and ModelOpt do); this project compiles no extensions.
_drop_log_record("torch.utils.cpp_extension", "No CUDA runtime is found")
# Megatron-Core 0.19 logs 'load_common is deprecated ...' whenever it reads a checkpoint's
# common.pt, which every checkpoint of this project carries so that 0.16-0.18 read it too
# (models/compat.py, write_common_state_file).
_drop_log_record("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated")
