"""Kernels change nothing (invariant 15): the GPU branch of the Mamba mixer, the decode step
and NVFP4 fake quantization, run on CPU through Triton's interpreter, equals the PyTorch path
the CPU runs: outputs, final states and every gradient.

Marker `kernels`: these run in their own leg, `make test-kernels` (part of `make test`), which
installs mamba-ssm, triton and einops and sets TRITON_INTERPRET=1 before Python starts;
tests/triton_interpreter.py holds the test-only shims (conftest installs them). Run bare,
without the interpreter, they are skipped with that reason.

Tolerances (fp32 throughout): the Triton scan and the PyTorch SSD are both chunked, but they
sum within and across chunks in different orders and the kernel computes exp(dA) segment
sums by cumulative differences, so outputs agree to a few float32 ulps of the largest value,
not bit for bit. `REL` bounds max |a - b| relative to max |b| per tensor; measured here
(interpreter, fp32) the worst case is about 1e-6, and a wrong argument (dt_bias zeroed, D
dropped, a head mapped to the wrong group) moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from conftest import preset, token_batch
from elastic_helpers import randomised_model

pytestmark = pytest.mark.kernels

REL = 2e-5  # see the module docstring


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = REL) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = (actual.detach().float() - expected.detach().float()).abs().max() / scale
    assert err <= rel, f"{what}: max relative difference {err.item():.3g} > {rel:g}"


def mixers(model):
    from elastic_megatron.models.mamba_mixer import HybridMambaMixer

    found = [m for m in model.modules() if isinstance(m, HybridMambaMixer)]
    assert found, "the model has no Mamba mixer"
    return found


def set_kernel(model, kernel: str) -> None:
    for m in mixers(model):
        m.kernel = kernel


def test_interpreter_leg_has_the_kernels():
    """The leg really runs the kernels: mamba_ssm's scan and decode step import (through the
    shims) and the mixer's `triton` branch accepts CPU tensors."""
    from elastic_megatron.inference import layers
    from elastic_megatron.models import mamba_mixer

    assert mamba_mixer.HAVE_MAMBA_SSM_KERNELS and layers.HAVE_SELECTIVE_STATE_UPDATE
    assert mamba_mixer.triton_interpreter()


CFG = preset("tiny")  # Mamba: 8 heads x 16 channels in 2 groups (4 heads per group), state 16, chunk 32


@pytest.fixture(scope="module")
def model(dist):
    return randomised_model(CFG, seed=5)


def _forward_backward(model, ids, pos, kernel: str):
    set_kernel(model, kernel)
    model.zero_grad(set_to_none=True)
    out = model(ids, pos, None).float()
    # A fixed random projection of the logits: every gradient depends on every output.
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("budget", ["full", "small"])
def test_model_forward_and_backward_through_the_triton_scan_equal_the_pytorch_ssd(model, budget):
    """The whole model (two Mamba layers with grouped heads, attention, MoE) in training mode,
    at the full budget and under the elastic masks of a smaller one (half the hidden size,
    6 of 8 Mamba heads, 12 of 16 head channels): logits and every parameter's gradient."""
    from elastic_megatron.elastic.masks import ElasticHooks, hard_masks
    from elastic_megatron.elastic.widths import Widths

    ids, pos = token_batch(CFG.vocab_size, batch=2, seq=40)  # a whole chunk of 32 and a partial one
    hooks = ElasticHooks(model, CFG)
    try:
        if budget == "small":
            hooks.set(hard_masks(CFG, Widths(hidden=32, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96,
                                             moe_ffn=32, moe_experts=6, shared_ffn=48)))
        model.train()
        triton_out, triton_grads = _forward_backward(model, ids, pos, "triton")
        torch_out, torch_grads = _forward_backward(model, ids, pos, "torch")
    finally:
        hooks.remove()
        set_kernel(model, "auto")
        model.eval()
    assert_rel_close(triton_out, torch_out, "logits")
    assert triton_grads.keys() == torch_grads.keys() and any("mixer" in n for n in torch_grads)
    for name, grad in torch_grads.items():
        assert_rel_close(triton_grads[name], grad, f"grad {name}")


def test_prefill_scan_final_states_equal_the_pytorch_ssd(model):
    """`mix_cached` (the decoder's prefill): output, conv tail and final SSM state."""
    mixer = mixers(model)[0]
    zxbcdt = torch.randn(3, 45, mixer.in_proj.weight.shape[0], generator=torch.Generator().manual_seed(1))
    try:
        results = {}
        for kernel in ("triton", "torch"):
            mixer.kernel = kernel
            with torch.no_grad():
                results[kernel] = mixer.mix_cached(zxbcdt)
    finally:
        mixer.kernel = "auto"
    for what, a, b in zip(("output", "conv tail", "final state"), results["triton"], results["torch"]):
        assert_rel_close(a, b, what)


def _scan_inputs(batch=2, seqlen=40, heads=4, head_dim=16, groups=2, state=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).requires_grad_()  # noqa: E731
    return dict(x=t(batch, seqlen, heads, head_dim), dt=t(batch, seqlen, heads, scale=0.5),
                A=(-0.5 - torch.rand(heads, generator=g)).requires_grad_(), B=t(batch, seqlen, groups, state),
                C=t(batch, seqlen, groups, state), D=t(heads), dt_bias=t(heads, scale=0.5))


def _grads(outputs, inputs: dict) -> dict:
    """Gradients of every input of a fixed random projection of `outputs` (a tensor or a tuple)."""
    g = torch.Generator().manual_seed(9)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((out * torch.randn(out.shape, generator=g)).sum() for out in outputs)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def test_scan_from_an_initial_state_equals_the_pytorch_ssd():
    """A scan continuing from a given state (the contract a chunked prefill or a sequence split
    across ranks relies on): output, final state and gradients, the initial state's included.
    (This project's context parallelism moves heads, not states, between ranks, and its prefill
    starts from zero; the kernel's initial-state path is still what a GPU would take.)"""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from elastic_megatron.models.ssd import ssd_chunk_scan

    results = {}
    for name, scan in (("triton", mamba_chunk_scan_combined), ("torch", ssd_chunk_scan)):
        inputs = _scan_inputs(seed=2)
        inputs["initial_states"] = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_()
        y, final = scan(chunk_size=32, dt_softplus=True, return_final_states=True, **inputs)
        results[name] = (y.detach(), final.detach(), _grads((y, final), inputs))
    (y_t, s_t, g_t), (y_r, s_r, g_r) = results["triton"], results["torch"]
    assert_rel_close(y_t, y_r, "output")
    assert_rel_close(s_t, s_r, "final state")
    for name in g_r:
        assert_rel_close(g_t[name], g_r[name], f"grad {name}")


def test_packed_documents_scan_as_if_each_were_alone():
    """Packed documents (`seq_idx`): the kernel's output for each document equals the PyTorch
    SSD of that document alone, gradients included: no state leaks across a boundary. The
    model itself does not pack documents yet (it refuses packed_seq_params); this holds the
    kernel to the contract its packed path would need."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from elastic_megatron.models.ssd import ssd_chunk_scan

    bounds = [0, 23, 50, 70]  # boundaries inside and across chunks of 32
    packed = _scan_inputs(batch=1, seqlen=bounds[-1], seed=6)
    seq_idx = torch.cat([torch.full((b - a,), i, dtype=torch.int32) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    y = mamba_chunk_scan_combined(chunk_size=32, dt_softplus=True, seq_idx=seq_idx[None], **packed)
    grads = _grads(y, packed)
    alone_inputs = {k: v.detach().clone().requires_grad_() for k, v in packed.items()}
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        doc = {k: (v[:, a:b] if k in ("x", "dt", "B", "C") else v) for k, v in alone_inputs.items()}
        pieces.append(ssd_chunk_scan(chunk_size=32, dt_softplus=True, **doc))
    alone = torch.cat(pieces, dim=1)
    assert_rel_close(y, alone, "output")
    for name, grad in _grads(alone, alone_inputs).items():
        assert_rel_close(grads[name], grad, f"grad {name}")


def test_gated_norm_equals_mamba_ssms_kernel():
    """The mixer's GatedRMSNorm (norm of y * silu(z) within groups) equals mamba_ssm's Triton
    `rmsnorm_fn(norm_before_gate=False)`, which Megatron-Core's own MambaMixer runs on GPU: a
    checkpoint means the same under either. Forward and gradients."""
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    from elastic_megatron.models.norms import GatedRMSNorm

    g = torch.Generator().manual_seed(8)
    y, z = torch.randn(2, 70, 128, generator=g), torch.randn(2, 70, 128, generator=g)
    norm = GatedRMSNorm(128, group_size=64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(128, generator=g))
    outs, grads = {}, {}
    for name in ("kernel", "ours"):
        yy, zz = y.clone().requires_grad_(), z.clone().requires_grad_()
        norm.weight.grad = None
        out = (rmsnorm_fn(yy, norm.weight, None, z=zz, eps=1e-5, group_size=64, norm_before_gate=False)
               if name == "kernel" else norm(yy, zz))
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        outs[name], grads[name] = out.detach(), (yy.grad, zz.grad, norm.weight.grad.clone())
    assert_rel_close(outs["kernel"], outs["ours"], "output")
    for what, a, b in zip(("grad y", "grad z", "grad weight"), grads["kernel"], grads["ours"]):
        assert_rel_close(a, b, what)


@pytest.fixture(scope="module")
def generator(dist, tmp_path_factory):
    """An elastic checkpoint of the tiny model with two budgets besides the full one."""
    from checkpoint_helpers import elastic_meta
    from elastic_megatron.checkpoint import store
    from elastic_megatron.elastic.widths import Widths, full_widths
    from elastic_megatron.inference.generator import ElasticGenerator

    budgets = {
        "full": full_widths(CFG),
        "small": Widths(hidden=32, attn_heads=2, mamba_heads=6, mamba_head_dim=12, ffn=96, moe_ffn=32,
                        moe_experts=6, shared_ffn=48),
    }
    run_dir = tmp_path_factory.mktemp("kernels") / "elastic"
    store.save_checkpoint(run_dir, randomised_model(CFG, seed=21), None, None, 3, 0,
                          elastic_meta(CFG, budgets, data={"tokenizer": {"type": "byte"}}))
    return ElasticGenerator.from_checkpoint(run_dir)


def _decode(dec, prompts, steps: int):
    logits, state = dec.prefill(prompts, steps)
    out = [logits]
    for _ in range(steps):
        out.append(dec.step(out[-1].argmax(-1), state))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("budget", ["full", "small"])
def test_decode_step_kernel_equals_the_pytorch_step(generator, budget):
    """Prefill (the Triton scan's final states) and 24 one-token steps through
    `selective_state_update` give the PyTorch step's logits at every position, for rows of
    different lengths, at the full budget and at a budget with 3 heads per group and 12-channel
    heads (a view of the parent); the greedy tokens are identical."""
    dec = generator.decoder(budget)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 40)]
    try:
        runs = {}
        for kernel in ("triton", "torch"):
            set_kernel(dec.model, kernel)
            runs[kernel] = _decode(dec, prompts, 24)
    finally:
        set_kernel(dec.model, "auto")
    assert_rel_close(runs["triton"], runs["torch"], "decode logits")
    assert torch.equal(runs["triton"].argmax(-1), runs["torch"].argmax(-1))


def test_modelopt_nvfp4_kernel_equals_the_cpu_path_on_nested_scales():
    """ModelOpt's Triton NVFP4 fake quantization (`fp4_fake_quant_block`, what its dynamic-block
    quantizer runs on Hopper and later GPUs) equals the CPU path (`formats.nvfp4_cpu`, the
    NVFP4QTensor round trip) bit for bit, on a parent weight and on two budgets' prefixes of it
    with the parent's global amax (nested scales: one set for all budgets); and a budget's
    fake-quantized prefix is the parent's fake-quantized sub-block. (ModelOpt's FP8 fake
    quantization on GPU is a CUDA extension, not Triton, so the interpreter cannot run it.)"""
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import fp4_fake_quant_block

    from elastic_megatron.quant import formats

    g = torch.Generator().manual_seed(0)
    parent = torch.randn(96, 256, generator=g) * torch.logspace(-2, 1, 256)  # blocks of very different ranges
    amax = parent.abs().amax()
    cpu = formats.new_quantizer("nvfp4", torch.device("cpu"))
    formats.set_amax(cpu, float(amax), torch.device("cpu"))
    whole = fp4_fake_quant_block(parent, amax)
    assert torch.equal(whole, cpu(parent))
    assert not torch.equal(whole, parent)
    for rows, cols in ((64, 192), (48, 128)):  # two budgets' row/column prefixes (block-aligned)
        prefix = parent[:rows, :cols].contiguous()
        kernel = fp4_fake_quant_block(prefix, amax)
        assert torch.equal(kernel, cpu(prefix)), (rows, cols)
        assert torch.equal(kernel, whole[:rows, :cols]), (rows, cols)
