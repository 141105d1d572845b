"""GPU-only checks (marker `gpu`; skipped with a reason on CPU machines).

The local backend on GPU runs the Mamba scan with mamba_ssm's Triton kernel; it must give
the logits of the pure-PyTorch SSD (the CPU path) for the same weights, in fp32. The
decode step, captured in a CUDA graph, must give the full forward's logits."""

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


@pytest.mark.skipif(not HAVE_MAMBA_SSM_KERNELS, reason="mamba_ssm Triton kernels are not installed")
def test_decode_step_triton_matches_pytorch_fp32(dist):
    """Cached decoding with the Triton kernels (the prefill's chunked scan, the decode step's
    selective_state_update) equals it with the pure-PyTorch ones (and so the full forward,
    tests/test_inference.py)."""
    from elastic_megatron.inference.decoder import HybridDecoder

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    prompt = token_batch(cfg.vocab_size, batch=1, seq=40)[0][0].tolist()
    runs = {}
    for kernel in ("triton", "torch"):
        _set_kernel(model, kernel)
        dec = HybridDecoder(model, cfg)
        logits, state = dec.prefill([prompt], 8)
        steps = [logits]
        for _ in range(8):
            steps.append(dec.step(steps[-1].argmax(-1), state))
        runs[kernel] = torch.stack(steps)
    torch.testing.assert_close(runs["triton"], runs["torch"], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_modelopt_gpu_fake_quant_equals_the_cpu_path(fmt):
    """ModelOpt's CUDA fake quantization (its dynamic-block NVFP4 kernel) gives the values
    of the CPU path (NVFP4QTensor round trip) for the same tensor and per-tensor amax."""
    from elastic_megatron.quant import formats

    torch.manual_seed(0)
    x = torch.randn(64, 256) * 3
    amax = x.abs().max()
    cpu, gpu = formats.new_quantizer(fmt, torch.device("cpu")), formats.new_quantizer(fmt, torch.device("cuda"))
    formats.set_amax(cpu, float(amax), torch.device("cpu"))
    formats.set_amax(gpu, float(amax), torch.device("cuda"))
    assert torch.equal(gpu(x.cuda()).cpu(), cpu(x))


def test_decode_step_captured_in_a_cuda_graph_equals_the_full_forward(dist):
    """The static decode step, captured once per state and replayed, gives the eager step's
    logits and the full forward's at every position, also while sequences join and leave
    the running state between replays (tests/test_inference.py's scenario)."""
    from elastic_megatron.inference.decoder import HybridDecoder
    from test_inference import assert_cached_equals_full, join_and_leave, prompts

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert next(model.parameters()).is_cuda
    graphed, eager = HybridDecoder(model, cfg, cuda_graph=True), HybridDecoder(model, cfg)
    batch = prompts((7, 45, 70))
    replayed = assert_cached_equals_full(graphed, batch, 10, tol=2e-4)
    stepped = assert_cached_equals_full(eager, batch, 10, tol=2e-4)
    torch.testing.assert_close(replayed, stepped, atol=2e-4, rtol=2e-4)
    _, state = graphed.prefill(batch[:1], 4)
    assert state.graph is not None
    join_and_leave(graphed, tol=2e-4)
