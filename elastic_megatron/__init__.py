"""elastic_megatron: Star Elastic on Megatron-Core (see README.md)."""

import warnings

# Megatron-Core warns once per module, at import, that Transformer Engine / Apex are
# missing (five lines per run). On CPU that is the expected set-up; on a GPU without TE
# `models.compat.apply` prints one short note instead.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Apex is not installed.*", category=UserWarning)
