"""elastic_megatron: Star Elastic on Megatron-Core (see README.md)."""

import warnings

# Megatron-Core warns once per module, at import, that Transformer Engine / Apex are
# missing (five lines per run). On CPU that is the expected set-up; on a GPU without TE
# `models.compat.apply` prints one short note instead.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Apex is not installed.*", category=UserWarning)
# Upstream deprecations of code paths Megatron-Core 0.16 itself takes on every checkpoint
# load and model build; nothing a user of this project can act on.
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor", category=FutureWarning)
# Megatron-Core 0.19 (hyper_comm_grid.py) warns at import that absl-py is missing and falls
# back to the standard logging module, which is what this project uses anyway.
warnings.filterwarnings("ignore", message=r"absl\.logging is not installed", category=UserWarning)


def _drop_no_cuda_runtime_note() -> None:
    """A CUDA build of torch on a machine without a GPU (Python 3.12 wheels are CUDA builds)
    logs 'No CUDA runtime is found, using CUDA_HOME=...' when anything imports
    torch.utils.cpp_extension (Megatron-Core and ModelOpt do). This project compiles no
    extensions; the line is noise on every command. Only that record is dropped."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("No CUDA runtime is found")

    logging.getLogger("torch.utils.cpp_extension").addFilter(_Drop())


_drop_no_cuda_runtime_note()
