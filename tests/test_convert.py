"""HF Nemotron-H import/export against transformers' own implementation, streaming
dist-checkpoint I/O, and the safety of the conversion tools."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from elastic_helpers import logits, randomised_model
from conftest import preset, token_batch
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.convert import hf_nemotron_h as hf
from elastic_megatron.convert.hf_checkpoint import export_hf, import_hf
from elastic_megatron.convert.megatron_dist import DistCheckpointSource, config_yaml, write_dist_checkpoint
from elastic_megatron.convert.tensors import SafetensorsSource, write_safetensors
from checkpoint_helpers import DictSource
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.checkpoint import metadata, store

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation (pip install -e .[test])")

# Every HF layer type, MoE with a shared expert; widths of our tiny preset.
HF_TINY = dict(
    vocab_size=384, hidden_size=64,
    layers_block_type=["linear_attention", "full_attention", "moe", "linear_attention", "mlp", "moe"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8,
    intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
    moe_shared_expert_intermediate_size=40, routed_scaling_factor=2.5, time_step_min=0.001,
    layer_norm_epsilon=1e-5, max_position_embeddings=1024, use_cache=False,
)


def random_hf_model(seed: int = 0):
    """A transformers NemotronHForCausalLM with every tensor random (norms, biases and
    Mamba's A/D/dt too, so a misplaced row cannot hide behind an initial value)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**HF_TINY)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                t.copy_(1.0 + 0.3 * noise)
            elif name.endswith("A_log"):
                t.copy_(torch.log(torch.arange(1, t.numel() + 1, dtype=torch.float32)) + 0.1 * noise)
            elif name.endswith(("dt_bias", "e_score_correction_bias", "conv1d.bias")):
                t.copy_(0.5 * noise)
            else:
                t.copy_(0.08 * noise)
    return model


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model = random_hf_model()
    model.save_pretrained(d)
    return d


def load_ours(checkpoint):
    cfg, _ = metadata.checkpoint_model_config(checkpoint)
    torch.manual_seed(5)
    model = build_model(cfg)
    store.load_model_weights(checkpoint, model)
    return model.eval(), cfg


def test_import_matches_transformers_logits(dist, hf_dir, tmp_path):
    out = import_hf(hf_dir, tmp_path / "imported", precision="fp32", name="hf_tiny")
    ours, cfg = load_ours(out)
    assert cfg.hybrid_pattern == "M*EM-E" and cfg.mamba_dt_min == pytest.approx(1e-3)
    assert cfg.moe_shared_expert_ffn_hidden_size == 40 and cfg.kv_channels == 16
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=29)  # ragged against the Mamba chunk size
    a, b = logits(ours, ids, pos), hf_logits(ref, ids)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())
    # The import writes the model recipe the trainer uses for further training.
    recipe = out / "recipes" / "model" / "hf_tiny.yaml"
    assert "hybrid_pattern: M*EM-E" in recipe.read_text()


def test_round_trip_hf_ours_hf_is_lossless(dist, hf_dir, tmp_path):
    ours = import_hf(hf_dir, tmp_path / "imported", precision="fp32")
    back = export_hf(ours, tmp_path / "exported", precision="fp32")
    # The export is in the released layout (backbone., one tensor per expert) ...
    names = set(SafetensorsSource(back).names())
    assert "backbone.layers.2.mixer.experts.7.down_proj.weight" in names and "lm_head.weight" in names
    # ... and transformers reads back exactly the tensors it started from.
    original = random_hf_model().state_dict()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, torch_dtype=torch.float32).state_dict()
    assert sorted(original) == sorted(reloaded)
    for k, v in original.items():
        assert torch.equal(v, reloaded[k]), k
    conf = json.loads((back / "config.json").read_text())
    assert conf["architectures"] == ["NemotronHForCausalLM"] and conf["time_step_min"] == pytest.approx(1e-3)


def test_export_of_our_model_matches_transformers_logits(dist, tmp_path):
    cfg = preset("tiny")
    model = randomised_model(cfg, seed=3)
    store.save_checkpoint(tmp_path / "run", model, None, None, 0, 0, {"config": config_yaml(cfg)})
    out = export_hf(tmp_path / "run", tmp_path / "hf", precision="fp32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=40)
    a, b = logits(model, ids, pos), hf_logits(ref, ids)
    assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())


# The keys of the released dense Nemotron-H config.json (nvidia/Nemotron-H-8B-Base-8K; its
# 47B/56B siblings carry the same set), written down from that published file: no MoE field.
RELEASED_DENSE_FIELDS = {
    "architectures", "attention_bias", "attention_dropout", "attention_head_dim", "auto_map", "bos_token_id",
    "chunk_size", "conv_kernel", "eos_token_id", "expand", "hidden_dropout", "hidden_size", "hybrid_override_pattern",
    "initializer_range", "intermediate_size", "layer_norm_epsilon", "mamba_head_dim", "mamba_hidden_act",
    "mamba_num_heads", "mamba_proj_bias", "max_position_embeddings", "mlp_bias", "mlp_hidden_act", "model_type",
    "n_groups", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "num_logits_to_keep",
    "pad_token_id", "rescale_prenorm_residual", "residual_in_fp32", "rms_norm_eps", "sliding_window",
    "ssm_state_size", "tie_word_embeddings", "time_step_floor", "time_step_limit", "time_step_max", "time_step_min",
    "time_step_rank", "torch_dtype", "transformers_version", "use_bias", "use_cache", "use_conv_bias",
    "use_mamba_kernels", "vocab_size",
}
# What an export adds, each a field of transformers 5's NemotronHConfig: its layer list, its
# name for torch_dtype, head_dim (the dense configs' remote code called it
# attention_head_dim), the SSM cache dtype.
EXPORT_EXTRAS = {"layers_block_type", "dtype", "head_dim", "mamba_ssm_cache_dtype"}
# transformers' NemotronHConfig MoE fields (its defaults stand in when they are absent).
MOE_KEYS = {"n_routed_experts", "output_router_logits", "n_shared_experts", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "moe_latent_size", "moe_shared_expert_overlap", "num_experts_per_tok",
            "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob"}


def test_a_dense_export_has_the_released_dense_fields_and_matches_transformers_logits(dist, tmp_path):
    """A pattern without `E` layers exports no MoE field (a reader would take the model for
    MoE); transformers builds it with every tensor in place and gives our logits; the
    import reads it back to the same model. A pattern without `-` layers has no
    intermediate_size and imports too."""
    from dataclasses import asdict, replace

    cfg = replace(preset("tiny"), hybrid_pattern="M*M-M-", name="tiny_dense")
    model = randomised_model(cfg, seed=4)
    store.save_checkpoint(tmp_path / "run", model, None, None, 0, 0, {"config": config_yaml(cfg)})
    out = export_hf(tmp_path / "run", tmp_path / "hf", precision="fp32")
    conf = json.loads((out / "config.json").read_text())
    assert not set(conf) & MOE_KEYS and "num_nextn_predict_layers" not in conf, sorted(set(conf) & MOE_KEYS)
    assert set(conf) - EXPORT_EXTRAS <= RELEASED_DENSE_FIELDS, sorted(set(conf) - EXPORT_EXTRAS - RELEASED_DENSE_FIELDS)
    assert conf["intermediate_size"] == cfg.ffn_hidden_size and conf["hybrid_override_pattern"] == "M*M-M-"
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, pos = token_batch(cfg.vocab_size, batch=2, seq=40)
    a, b = logits(model, ids, pos), hf_logits(ref.eval(), ids)
    assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())
    ours, imported = load_ours(import_hf(out, tmp_path / "imported", precision="fp32"))
    assert imported.hybrid_pattern == cfg.hybrid_pattern and imported.ffn_hidden_size == cfg.ffn_hidden_size
    assert torch.equal(logits(ours, ids, pos), a)
    moe_only = replace(preset("tiny"), hybrid_pattern="M*EME", name="tiny_moe")
    conf = hf.hf_config_from_model(moe_only, torch.bfloat16)
    assert "intermediate_size" not in conf and MOE_KEYS - set(conf) == {"output_router_logits", "moe_shared_expert_overlap"}
    back = asdict(hf.model_config_from_hf(conf, name="tiny_moe"))
    for key in ("kv_channels", "mamba_dt_min", "moe_token_dispatcher", "ffn_hidden_size"):  # derived, or unused here
        back.pop(key)
    assert back == {k: v for k, v in asdict(moe_only).items() if k in back}


def test_dist_checkpoint_source_and_writer_round_trip(dist, tmp_path):
    """Reading our checkpoint key by key gives the model's state dict; writing it back
    with the lazy writer gives a checkpoint Megatron's loader reads identically."""
    cfg = preset("tiny")
    model = randomised_model(cfg, seed=4)
    store.save_checkpoint(tmp_path / "a", model, None, None, 0, 0, {"config": config_yaml(cfg)})
    src = DistCheckpointSource(tmp_path / "a")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(src.names()) == sorted(sd)
    for name in src.names():
        assert src.spec(name).shape == sd[name].shape
        assert torch.equal(src.get(name), sd[name]), name
    write_dist_checkpoint(tmp_path / "b", cfg, src, {"config": config_yaml(cfg)})
    again, _ = load_ours(tmp_path / "b")
    for k, v in again.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, sd[k]), k


def test_bf16_export_keeps_router_bias_fp32(dist, tmp_path):
    cfg = preset("tiny")
    model = randomised_model(cfg, seed=6)
    store.save_checkpoint(tmp_path / "run", model, None, None, 0, 0, {"config": config_yaml(cfg)})
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    src = SafetensorsSource(out)
    dtypes = {n: src.spec(n).dtype for n in src.names()}
    assert dtypes["backbone.layers.2.mixer.gate.e_score_correction_bias"] == torch.float32
    assert {d for n, d in dtypes.items() if "e_score" not in n} == {torch.bfloat16}


def test_safetensors_writer_shards_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(100 + i, 3) for i in range(5)}
    tensors["b"] = torch.arange(7, dtype=torch.int64)
    index = write_safetensors(tmp_path, DictSource(tensors), max_shard_bytes=3000, desc=None)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert set(index["weight_map"].values()) == set(files)
    back = SafetensorsSource(tmp_path)
    for k, v in tensors.items():
        assert torch.equal(back.get(k), v)
    # safetensors' own reader agrees with our writer.
    from safetensors.torch import load_file

    merged = {}
    for f in files:
        merged.update(load_file(tmp_path / f))
    assert all(torch.equal(merged[k], v) for k, v in tensors.items())


def test_import_refusals(dist, hf_dir, tmp_path):
    # Truncated shard: clear error, nothing written.
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    shard = next(broken.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="truncated"):
        import_hf(broken, tmp_path / "out1")
    # A shard the index lists but that is missing.
    missing = tmp_path / "missing"
    shutil.copytree(hf_dir, missing)
    shard = next(missing.glob("*.safetensors"))
    (missing / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="missing"):
        import_hf(missing, tmp_path / "out2")
    # Something our model cannot express, named.
    biased = tmp_path / "biased"
    shutil.copytree(hf_dir, biased)
    conf = json.loads((biased / "config.json").read_text())
    conf["mlp_bias"] = True
    (biased / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="mlp_bias"):
        import_hf(biased, tmp_path / "out3")
    # config.json whose sizes disagree with its tensors: refused before anything is written
    # (transformers would silently drop or pad rows).
    for i, (key, value, says) in enumerate((("vocab_size", 200, "config.json's sizes imply"),
                                            ("intermediate_size", 8, "config.json's sizes imply"),
                                            ("hidden_size", 48, "config.json"))):
        wrong = tmp_path / f"wrong{i}"
        shutil.copytree(hf_dir, wrong)
        conf = json.loads((wrong / "config.json").read_text())
        conf[key] = value
        (wrong / "config.json").write_text(json.dumps(conf))
        with pytest.raises(ConfigError, match=says):
            import_hf(wrong, tmp_path / f"wrong-out{i}")
        assert not (tmp_path / f"wrong-out{i}").exists()
    # Malformed config.json and a corrupt safetensors header: one clear error each.
    malformed = tmp_path / "malformed"
    shutil.copytree(hf_dir, malformed)
    (malformed / "config.json").write_text('{"model_type": "nemotron_h", ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        import_hf(malformed, tmp_path / "out4")
    header = tmp_path / "header"
    shutil.copytree(hf_dir, header)
    shard = next(header.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff" * 8  # inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt header"):
        import_hf(header, tmp_path / "out5")
    # Non-empty target refused unless --overwrite.
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        import_hf(hf_dir, target)
    assert (target / "keep.txt").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left behind
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3, 4, 5))


def test_hf_config_mapping_is_inverse(dist):
    cfg = hf.model_config_from_hf(hf.hf_config_from_model(preset("tiny"), torch.bfloat16) | {"model_type": "nemotron_h"}, name="tiny")
    from dataclasses import asdict

    a, b = asdict(cfg), asdict(preset("tiny"))
    for key in ("kv_channels", "mamba_dt_min", "moe_token_dispatcher"):
        a.pop(key), b.pop(key)
    assert a == b


def test_import_reads_transformers_in_memory_layout(dist, tmp_path):
    """transformers' own names (model., experts fused into [E, ...] tensors) import too."""
    model = random_hf_model(seed=2)
    d = tmp_path / "fused"
    d.mkdir()
    write_safetensors(d, DictSource({k: v.contiguous() for k, v in model.state_dict().items()}), desc=None)
    (d / "config.json").write_text(json.dumps({"model_type": "nemotron_h", **HF_TINY}))
    assert "model.layers.2.mixer.experts.up_proj" in SafetensorsSource(d).names()
    ours, cfg = load_ours(import_hf(d, tmp_path / "imported", precision="fp32"))
    ids, pos = token_batch(cfg.vocab_size, batch=1, seq=24)
    a, b = logits(ours, ids, pos), hf_logits(model, ids)
    assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())
