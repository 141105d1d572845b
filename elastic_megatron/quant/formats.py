"""The two number formats, through NVIDIA Model Optimizer (ModelOpt).

FP8 (E4M3): one scale per tensor, `amax / 448`, for weights and for activations.
NVFP4: E2M1 values in blocks of 16 along the input dimension, one FP8-E4M3 scale per
block and one FP32 global scale per tensor (`amax / (6 * 448)`); packed two values per
byte (the even element in the low nibble).

Nested quantization rests on one fact, tested bit for bit: with the *parent's* global
scale, the blocks of a row/column prefix (block-aligned) quantize exactly like the same
blocks of the parent, because a block's scale depends on its 16 values and the global
scale only. So every budget shares the parent's scales and a slice is a sub-block.

ModelOpt does the arithmetic: `NVFP4QTensor` / `FP8QTensor` for real (packed) tensors,
`TensorQuantizer` for fake quantization and max calibration. ModelOpt's NVFP4 fake
quantization in `TensorQuantizer` needs CUDA tensors (its dynamic-block kernel); on CPU
`nvfp4_cpu` below fake-quantizes through `NVFP4QTensor.quantize/dequantize` with a
straight-through gradient (tests/test_gpu.py holds the two equal on a GPU).
"""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():  # ModelOpt announces optional plugins it cannot load
    warnings.simplefilter("ignore")
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend
    from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

FORMATS = ("fp8", "nvfp4")
BLOCK = 16  # NVFP4 values per block scale
E4M3_MAX = 448.0
E2M1_MAX = 6.0
_CPU_BACKEND = "elastic_megatron_nvfp4_cpu"


def max_bound(fmt: str) -> float:
    """Largest representable magnitude relative to the per-tensor scale: amax / scale."""
    return E4M3_MAX if fmt == "fp8" else E2M1_MAX * E4M3_MAX


def tensor_scale(fmt: str, amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP32 scale of `amax`: FP8 `weight_scale` / `input_scale`, NVFP4
    `weight_scale_2` / `input_scale` (ModelOpt's exporter divides by the same bounds)."""
    return (amax.detach().float() / max_bound(fmt)).reshape(())


# ---- real (packed) tensors, for export ---------------------------------------------------

def encode_weight(fmt: str, weight: torch.Tensor, amax: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exported tensors of one weight quantized with the per-tensor `amax`:
    fp8: weight (float8_e4m3fn), weight_scale; nvfp4: weight (uint8, two values per
    byte), weight_scale (float8_e4m3fn per block of 16), weight_scale_2."""
    w = weight.detach().float()
    scale = tensor_scale(fmt, amax)
    if fmt == "fp8":
        q, s = FP8QTensor.quantize(w, scales=scale)
        return {"weight": q._quantized_data, "weight_scale": s.float().reshape(())}
    require_blocks(w.shape[-1], "the input dimension of an NVFP4 weight")
    q, block_scale, scale_2 = NVFP4QTensor.quantize(w, BLOCK, weights_scaling_factor_2=scale)
    return {"weight": q._quantized_data, "weight_scale": block_scale, "weight_scale_2": scale_2.float().reshape(())}


def decode_weight(fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values `encode_weight` stored, dequantized."""
    if fmt == "fp8":
        return (tensors["weight"].float() * tensors["weight_scale"].float()).to(dtype)
    packed = tensors["weight"]
    q = NVFP4QTensor(torch.Size((packed.shape[0], packed.shape[1] * 2)), torch.float32, packed)
    return q.dequantize(dtype=torch.float32, scale=tensors["weight_scale"], double_scale=tensors["weight_scale_2"],
                        block_sizes={-1: BLOCK}).to(dtype)


def require_blocks(n: int, what: str) -> None:
    if n % BLOCK:
        raise ValueError(f"{what} is {n}, not a multiple of the NVFP4 block size {BLOCK}")


# ---- fake quantization and calibration ----------------------------------------------------

class _NVFP4RoundTrip(torch.autograd.Function):
    """NVFP4 quantize -> dequantize with the tensor's global scale; gradient passes straight
    through (ModelOpt's GPU kernel does the same with its pass-through backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.detach().float().reshape(-1, shape[-1])
        q, block_scale, scale_2 = NVFP4QTensor.quantize(flat, BLOCK, weights_scaling_factor_2=tensor_scale("nvfp4", amax))
        out = q.dequantize(dtype=torch.float32, scale=block_scale, double_scale=scale_2, block_sizes={-1: BLOCK})
        return out.reshape(shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def nvfp4_cpu(inputs: torch.Tensor, quantizer: TensorQuantizer) -> torch.Tensor:
    amax = quantizer.amax if quantizer.amax is not None else inputs.detach().abs().amax()
    return _NVFP4RoundTrip.apply(inputs, amax.to(inputs.device))


register_quant_backend(_CPU_BACKEND, nvfp4_cpu)


def quantizer_attributes(fmt: str, device: torch.device) -> QuantizerAttributeConfig:
    """ModelOpt attributes of one per-tensor-calibrated quantizer (weight or input) as
    ModelOpt's MAMBA_MOE_{FP8,NVFP4}_*_CFG define them; NVFP4 on CPU through `nvfp4_cpu`."""
    if fmt == "fp8":
        return QuantizerAttributeConfig(num_bits=(4, 3), axis=None)
    if device.type == "cuda":
        return QuantizerAttributeConfig(num_bits=(2, 1), block_sizes={-1: BLOCK, "type": "dynamic", "scale_bits": (4, 3)})
    return QuantizerAttributeConfig(num_bits=(2, 1), axis=None, backend=_CPU_BACKEND)


def new_quantizer(fmt: str, device: torch.device) -> TensorQuantizer:
    return TensorQuantizer(quantizer_attributes(fmt, device)).to(device)


def start_calibration(q: TensorQuantizer) -> None:
    """Max calibration: the quantizer records max |x| and passes x through unchanged."""
    q.disable_quant()
    q.enable_calib()


def finish_calibration(q: TensorQuantizer) -> None:
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()


def set_amax(q: TensorQuantizer, value: float, device: torch.device) -> None:
    q.amax = torch.tensor(float(value), dtype=torch.float32, device=device)
    q.disable_calib()
    q.enable_quant()
