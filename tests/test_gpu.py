"""GPU-only checks (marker `gpu`; skipped with a reason on CPU machines).

The local backend on GPU runs the Mamba scan with mamba_ssm's Triton kernel; it must give
the logits of the pure-PyTorch SSD (the CPU path) for the same weights, in fp32."""

from __future__ import annotations

import pytest
import torch

from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.mamba_mixer import HAVE_MAMBA_SSM_KERNELS, HybridMambaMixer

from conftest import preset, token_batch

pytestmark = pytest.mark.gpu


def _set_kernel(model, kernel: str) -> int:
    mixers = [m for m in model.modules() if isinstance(m, HybridMambaMixer)]
    for m in mixers:
        m.kernel = kernel
    return len(mixers)


@pytest.mark.skipif(not HAVE_MAMBA_SSM_KERNELS, reason="mamba_ssm Triton kernels are not installed")
@pytest.mark.parametrize("name", ["tiny", "small"])
def test_triton_scan_matches_pytorch_ssd_fp32(dist, name):
    cfg = preset(name, max_sequence_length=512)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=300)
    ids, pos = ids.cuda(), pos.cuda()
    assert _set_kernel(model, "triton") > 0
    with torch.no_grad():
        triton_logits = model(ids, pos, None)
        _set_kernel(model, "torch")
        torch_logits = model(ids, pos, None)
    torch.testing.assert_close(triton_logits, torch_logits, atol=2e-4, rtol=2e-4)
