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
