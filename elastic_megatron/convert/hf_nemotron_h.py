"""Hugging Face Nemotron-H <-> our Megatron model: config and tensor adapters.

The HF side is the layout of the released Nemotron 3 Nano checkpoints, which
transformers' `NemotronHForCausalLM` loads without custom code:

| HF (`backbone.` prefix; transformers' own `model.` also read) | ours (flat naming)                         |
|----------------------------------------------|-------------------------------------------------------|
| embeddings.weight, norm_f.weight, lm_head.weight | embedding.word_embeddings, decoder.final_norm, output_layer |
| layers.{i}.norm.weight                       | the layer's pre-norm (norm / input_layernorm / pre_mlp_layernorm) |
| mixer.in_proj, conv1d, A_log, D, dt_bias, norm, out_proj | mixer.* (same z/xBC/dt layout)            |
| mixer.q_proj, k_proj, v_proj                 | self_attention.linear_qkv, per query group [q heads, k, v] |
| mixer.o_proj                                 | self_attention.linear_proj                            |
| mixer.up_proj, down_proj ('-' layers)        | mlp.linear_fc1, linear_fc2                            |
| mixer.gate.weight, gate.e_score_correction_bias | mlp.router.weight, expert_bias                     |
| mixer.experts.{e}.up_proj/down_proj (or fused [E, ...]) | mlp.experts.local_experts.{e}.linear_fc1/fc2 |
| mixer.shared_experts.up_proj/down_proj       | mlp.shared_experts.linear_fc1/fc2                     |

Numerics that must agree, and do: sigmoid router scores plus the correction bias for the
choice only, top-k weights renormalised then scaled; squared-ReLU MLPs; gated group
RMSNorm over `d_inner / n_groups` channels; transformers clamps the Mamba step size at
`time_step_min`, which becomes `model.mamba_dt_min`. Anything our model cannot express
(biases, latent MoE projections, multi-token prediction, grouped routing, tied
embeddings) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig, validate_model_config
from elastic_megatron.convert.tensors import MappedSource, TensorSource

_HF_LAYER = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_OUR_SYMBOL = {v: k for k, v in _HF_LAYER.items()}
# Older config.json field names (the released checkpoints' remote-code era) -> current ones.
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_chunk_size": "chunk_size",
            "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_conv_bias": "use_conv_bias",
            "attention_head_dim": "head_dim"}
_ACTIVATIONS = {"relu2": "squared_relu"}
_PRENORM = {MAMBA: "norm.weight", ATTENTION: "input_layernorm.weight", MLP: "pre_mlp_layernorm.weight", MOE: "pre_mlp_layernorm.weight"}
# Written only for a pattern with MoE layers: released dense Nemotron-H configs carry none of
# them, and a reader may take any of them for the MoE architecture (llama.cpp's converter
# does so on num_experts_per_tok). num_nextn_predict_layers came with the MoE generation too.
MOE_FIELDS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
              "n_shared_experts", "moe_latent_size", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group",
              "num_nextn_predict_layers")
# Written only for a pattern with dense MLP layers ('-'); mlp_hidden_act and mlp_bias stay
# (MoE experts read them too).
DENSE_MLP_FIELDS = ("intermediate_size",)


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ConfigError("--hf-dir", str(directory), "has no config.json (expected a Hugging Face Nemotron-H directory)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError("--hf-dir", str(path), f"config.json is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ConfigError("--hf-dir", str(path), "config.json is not a JSON object")
    for old, new in _ALIASES.items():
        if old in cfg and new not in cfg:
            cfg[new] = cfg.pop(old)
    if cfg.get("model_type") != "nemotron_h":
        raise ConfigError("config.json model_type", cfg.get("model_type"), "must be 'nemotron_h'")
    return cfg


def _pattern(hf: dict) -> str:
    """The layer pattern of either convention: transformers 5's `layers_block_type` list or
    the released checkpoints' `hybrid_override_pattern` string (with `num_hidden_layers`).
    A config that carries both must say the same thing in both."""
    pattern = None
    if hf.get("layers_block_type"):
        unknown = sorted(set(hf["layers_block_type"]) - set(_OUR_SYMBOL))
        if unknown:
            raise ConfigError("config.json layers_block_type", unknown, f"allowed: {sorted(_OUR_SYMBOL)}")
        pattern = "".join(_OUR_SYMBOL[t] for t in hf["layers_block_type"])
    override = hf.get("hybrid_override_pattern")
    if override:
        if not isinstance(override, str) or set(override) - set(_HF_LAYER):
            raise ConfigError("config.json hybrid_override_pattern", override, f"a string of {sorted(_HF_LAYER)}")
        if pattern is not None and override != pattern:
            raise ConfigError("config.json hybrid_override_pattern", override,
                              f"disagrees with layers_block_type ({pattern}); the two conventions must name the same layers")
        pattern = override
    if pattern is None:
        raise ConfigError("config.json", "layers_block_type", "missing (and no hybrid_override_pattern)")
    layers = hf.get("num_hidden_layers")
    if layers is not None and layers != len(pattern):
        raise ConfigError("config.json num_hidden_layers", layers, f"must be the pattern's length, {len(pattern)} ({pattern})")
    return pattern


def model_config_from_hf(hf: dict, name: str = "hf_nemotron_h") -> ModelConfig:
    """Our ModelConfig of an HF Nemotron-H config dict; refuses what we cannot express."""
    def refuse(key, allowed):
        raise ConfigError(f"config.json {key}", hf.get(key), f"is not supported by this model; allowed: {allowed}")

    for key in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias", "tie_word_embeddings"):
        if hf.get(key):
            refuse(key, "false")
    if hf.get("use_conv_bias", True) is not True:
        refuse("use_conv_bias", "true")
    if hf.get("moe_latent_size") is not None:
        refuse("moe_latent_size", "null")
    if hf.get("num_nextn_predict_layers", 0):
        refuse("num_nextn_predict_layers", "0 (multi-token prediction layers are not converted)")
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
        refuse("n_group", "1 (no grouped routing)")
    if hf.get("norm_topk_prob", True) is not True:
        refuse("norm_topk_prob", "true")
    if hf.get("n_shared_experts", 1) != 1:
        refuse("n_shared_experts", "1")
    if hf.get("mamba_hidden_act", "silu") != "silu":
        refuse("mamba_hidden_act", "'silu'")
    act = hf.get("mlp_hidden_act", "relu2")
    if act not in _ACTIVATIONS:
        refuse("mlp_hidden_act", sorted(_ACTIVATIONS))
    pattern = _pattern(hf)
    heads = hf.get("num_attention_heads", 32)
    cfg = ModelConfig(
        name=name,
        hybrid_pattern=pattern,
        hidden_size=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        mamba_num_heads=hf.get("mamba_num_heads", 128),
        mamba_head_dim=hf.get("mamba_head_dim", 64),
        mamba_state_dim=hf.get("ssm_state_size", 128),
        mamba_num_groups=hf.get("n_groups", 8),
        mamba_conv_kernel=hf.get("conv_kernel", 4),
        mamba_chunk_size=hf.get("chunk_size", 128),
        mamba_dt_min=float(hf.get("time_step_min", 0.001)),
        ffn_hidden_size=hf.get("intermediate_size", 21504),
        moe_num_experts=hf.get("n_routed_experts", 8),
        moe_router_topk=hf.get("num_experts_per_tok", 2),
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", 7688),
        moe_shared_expert_ffn_hidden_size=hf.get("moe_shared_expert_intermediate_size", 7688),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        activation=_ACTIVATIONS[act],
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    validate_model_config(cfg)
    return cfg


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, tokens: Optional[dict] = None) -> dict:
    """config.json of the HF export of a model of `cfg`, in both conventions its readers use:
    transformers 5's `layers_block_type` and the released Nemotron 3 Nano configs'
    `hybrid_override_pattern` + `num_hidden_layers` (their remote code, older transformers
    and vLLM's own NemotronHConfig read these), with the field names the released configs
    carry (`n_groups`, `conv_kernel`, `chunk_size`, `time_step_min`, the MoE fields).
    `MOE_FIELDS` only when the pattern has an `E` layer and `DENSE_MLP_FIELDS` only when it
    has a `-` layer, as the released dense (Nemotron-H 8B/47B/56B) and MoE (Nemotron 3 Nano)
    configs do. `tokens`: bos/eos/pad ids of the tokenizer the export carries."""
    def refuse(key, value, allowed):
        raise ConfigError(f"model.{key}", value, f"has no Hugging Face Nemotron-H equivalent; allowed: {allowed}")

    if cfg.activation not in _ACTIVATIONS.values():
        refuse("activation", cfg.activation, sorted(_ACTIVATIONS.values()))
    if cfg.count(MOE):
        if cfg.moe_router_score_function != "sigmoid":
            refuse("moe_router_score_function", cfg.moe_router_score_function, "'sigmoid'")
        if not cfg.moe_shared_expert_ffn_hidden_size:
            refuse("moe_shared_expert_ffn_hidden_size", 0, "> 0 (HF Nemotron-H always has a shared expert)")
    dtype_name = str(dtype).removeprefix("torch.")
    conf = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # transformers 4 and vLLM's older readers
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [_HF_LAYER[s] for s in cfg.hybrid_pattern],
        "hybrid_override_pattern": cfg.hybrid_pattern,
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_sequence_length,
        "tie_word_embeddings": False,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "attention_bias": False,
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "use_bias": False,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.mamba_state_dim,
        "n_groups": cfg.mamba_num_groups,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "mamba_hidden_act": "silu",
        "mamba_ssm_cache_dtype": "float32",  # our scan keeps the SSM state in fp32
        # transformers clamps dt at time_step_min; 0 keeps our (unclamped) function.
        "time_step_min": cfg.mamba_dt_min,
        "n_routed_experts": cfg.moe_num_experts,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_ffn_hidden_size,
        "n_shared_experts": 1,
        "moe_latent_size": None,
        "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_method_std,
        "residual_in_fp32": False,
        "use_cache": True,
        **(tokens or {}),
    }
    unused = (MOE_FIELDS if not cfg.count(MOE) else ()) + (DENSE_MLP_FIELDS if not cfg.count(MLP) else ())
    return {k: v for k, v in conf.items() if k not in unused}


def _qkv_split(cfg: ModelConfig):
    g, hd = cfg.num_query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g

    def split(qkv: torch.Tensor, part: str) -> torch.Tensor:
        grouped = qkv.reshape(g, (hpg + 2) * hd, qkv.shape[-1])
        lo, hi = {"q": (0, hpg * hd), "k": (hpg * hd, (hpg + 1) * hd), "v": ((hpg + 1) * hd, (hpg + 2) * hd)}[part]
        return grouped[:, lo:hi].reshape(-1, qkv.shape[-1]).contiguous()

    def fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = q.shape[-1]
        return torch.cat([q.reshape(g, hpg * hd, h), k.reshape(g, hd, h), v.reshape(g, hd, h)], dim=1).reshape(-1, h)

    return split, fuse


def _layer_pairs(cfg: ModelConfig, i: int, hf_prefix: str) -> list[tuple[str, str]]:
    """(HF name, flat name) of the tensors that map one to one in layer `i`."""
    symbol = cfg.hybrid_pattern[i]
    hp, op = f"{hf_prefix}layers.{i}.", f"decoder.layers.{i}."
    pairs = [(hp + "norm.weight", op + _PRENORM[symbol])]
    if symbol == MAMBA:
        for t in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight"):
            pairs.append((hp + "mixer." + t, op + "mixer." + t))
    elif symbol == ATTENTION:
        pairs.append((hp + "mixer.o_proj.weight", op + "self_attention.linear_proj.weight"))
    elif symbol == MLP:
        pairs += [(hp + "mixer.up_proj.weight", op + "mlp.linear_fc1.weight"),
                  (hp + "mixer.down_proj.weight", op + "mlp.linear_fc2.weight")]
    elif symbol == MOE:
        pairs += [(hp + "mixer.gate.weight", op + "mlp.router.weight"),
                  (hp + "mixer.gate.e_score_correction_bias", op + "mlp.router.expert_bias"),
                  (hp + "mixer.shared_experts.up_proj.weight", op + "mlp.shared_experts.linear_fc1.weight"),
                  (hp + "mixer.shared_experts.down_proj.weight", op + "mlp.shared_experts.linear_fc2.weight")]
    return pairs


def _identity(t):
    return t


def hf_to_flat(source: TensorSource, cfg: ModelConfig) -> MappedSource:
    """Our flat tensors as a lazy view of an HF Nemotron-H source (released `backbone.`
    layout with per-expert tensors, or transformers' `model.` layout with fused experts)."""
    names = set(source.names())
    prefix = "backbone." if "backbone.embeddings.weight" in names else "model."
    if prefix + "embeddings.weight" not in names:
        raise ConfigError("checkpoint", "safetensors", "has no backbone.embeddings.weight / model.embeddings.weight: not a Nemotron-H checkpoint")
    _, fuse = _qkv_split(cfg)
    rules: dict[str, Any] = {
        "embedding.word_embeddings.weight": ((prefix + "embeddings.weight",), _identity),
    }
    for i, symbol in enumerate(cfg.hybrid_pattern):
        for hf_name, flat in _layer_pairs(cfg, i, prefix):
            rules[flat] = ((hf_name,), _identity)
        hp, op = f"{prefix}layers.{i}.mixer.", f"decoder.layers.{i}."
        if symbol == ATTENTION:
            rules[op + "self_attention.linear_qkv.weight"] = ((hp + "q_proj.weight", hp + "k_proj.weight", hp + "v_proj.weight"), fuse)
        if symbol == MOE:
            fused = hp + "experts.up_proj" in names
            for e in range(cfg.moe_num_experts):
                for hf_part, fc in (("up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
                    flat = f"{op}mlp.experts.local_experts.{e}.{fc}.weight"
                    if fused:
                        rules[flat] = ((hp + f"experts.{hf_part}",), (lambda e: lambda t: t[e])(e))
                    else:
                        rules[flat] = ((hp + f"experts.{e}.{hf_part}.weight",), _identity)
    rules["decoder.final_norm.weight"] = ((prefix + "norm_f.weight",), _identity)
    rules["output_layer.weight"] = (("lm_head.weight",), _identity)
    missing = sorted({i for inputs, _ in rules.values() for i in inputs} - names)
    if missing:
        raise ConfigError("checkpoint", f"{len(missing)} tensors missing", f"the config needs them, e.g. {missing[0]!r}")
    return MappedSource(source, rules)


def flat_to_hf(source: TensorSource, cfg: ModelConfig) -> MappedSource:
    """The HF (released `backbone.` layout, per-expert tensors) view of a flat source."""
    split, _ = _qkv_split(cfg)
    rules: dict[str, Any] = {"backbone.embeddings.weight": (("embedding.word_embeddings.weight",), _identity)}
    for i, symbol in enumerate(cfg.hybrid_pattern):
        for hf_name, flat in _layer_pairs(cfg, i, "backbone."):
            if flat.endswith("expert_bias") and not cfg.moe_router_enable_expert_bias:
                # HF always has the correction bias; a model without one has zeros.
                rules[hf_name] = ((f"decoder.layers.{i}.mlp.router.weight",), _zero_bias)
                continue
            rules[hf_name] = ((flat,), _identity)
        hp, op = f"backbone.layers.{i}.mixer.", f"decoder.layers.{i}."
        if symbol == ATTENTION:
            qkv = op + "self_attention.linear_qkv.weight"
            for part in ("q", "k", "v"):
                rules[hp + f"{part}_proj.weight"] = ((qkv,), (lambda part: lambda t: split(t, part))(part))
        if symbol == MOE:
            for e in range(cfg.moe_num_experts):
                for hf_part, fc in (("up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
                    rules[hp + f"experts.{e}.{hf_part}.weight"] = ((f"{op}mlp.experts.local_experts.{e}.{fc}.weight",), _identity)
    rules["backbone.norm_f.weight"] = (("decoder.final_norm.weight",), _identity)
    rules["lm_head.weight"] = (("output_layer.weight",), _identity)
    return MappedSource(source, rules)


def _zero_bias(router_weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros(router_weight.shape[0], dtype=torch.float32, device=router_weight.device)


def keep_fp32(name: str) -> bool:
    """Tensors kept in fp32 whatever the export precision: the router's correction bias (as
    in the released checkpoint and Megatron) and the per-tensor scales of a quantized
    export (ModelOpt's unified format stores them in fp32)."""
    return name.endswith(("e_score_correction_bias", "router.expert_bias", ".weight_scale_2", ".input_scale", ".weight_scale"))


def write_hf_config(directory: str | Path, cfg: ModelConfig, dtype: torch.dtype, tokens: Optional[dict] = None) -> None:
    """config.json and generation_config.json (the tokenizer's bos/eos/pad ids when known)."""
    conf = hf_config_from_model(cfg, dtype, tokens)
    (Path(directory) / "config.json").write_text(json.dumps(conf, indent=2, allow_nan=False) + "\n")
    generation = {k: v for k, v in (tokens or {}).items() if v is not None}
    (Path(directory) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def check_shapes(flat: TensorSource, cfg: ModelConfig, where: str) -> None:
    """Every parameter the config implies exists in `flat` (an HF view) with that shape,
    read from the shard headers only: a config.json whose sizes disagree with its tensors
    is refused before anything is written (transformers would drop or pad rows)."""
    from elastic_megatron.models.counter import parameter_inventory

    names = set(flat.names())
    for entry in parameter_inventory(cfg):
        if entry.name not in names:
            raise ConfigError("--hf-dir", where, f"lacks the tensor for {entry.name} that config.json implies")
        try:
            shape = tuple(flat.spec(entry.name).shape)
        except (RuntimeError, ValueError) as err:
            raise ConfigError("--hf-dir", where, f"the tensors for {entry.name} do not fit config.json's sizes ({err})") from None
        if shape != tuple(entry.shape):
            raise ConfigError("--hf-dir", where, f"{entry.name}: the safetensors hold shape {list(shape)}, config.json's sizes "
                              f"imply {list(entry.shape)} (vocab_size, hidden_size, intermediate sizes, heads?)")


_HF_LINEARS = {"mixer.in_proj": ("mixer.in_proj",), "mixer.out_proj": ("mixer.out_proj",),
               "self_attention.linear_qkv": ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj"),
               "self_attention.linear_proj": ("mixer.o_proj",), "mlp.linear_fc1": ("mixer.up_proj",),
               "mlp.linear_fc2": ("mixer.down_proj",), "mlp.shared_experts.linear_fc1": ("mixer.shared_experts.up_proj",),
               "mlp.shared_experts.linear_fc2": ("mixer.shared_experts.down_proj",)}


def hf_linear_names(module: str) -> list[str]:
    """The HF module names (released `backbone.` layout) of one flat decoder linear."""
    import re

    m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", module)
    if m is None:
        raise KeyError(f"{module!r} is not a decoder linear")
    i, rest = m.group(1), m.group(2)
    e = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])$", rest)
    parts = ((f"mixer.experts.{e.group(1)}.{'up_proj' if e.group(2) == '1' else 'down_proj'}",) if e else _HF_LINEARS[rest])
    return [f"backbone.layers.{i}.{p}" for p in parts]
