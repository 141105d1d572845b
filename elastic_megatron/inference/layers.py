"""Each layer kind's decode step (one new token per sequence) and prefill (a prompt chunk),
on Megatron's modules.

Megatron's training forward does work that one token per sequence does not need: MoE
token permutation through a dispatcher, sequence-parallel regions and autograd functions
around every linear, bias-dropout-add, [s, b, h] transposes, a conv kernel over a padded
window. Here each layer kind's step (`__call__`) is written for hidden states
[rows, hidden] (one token per sequence) with as few tensor operations as the math allows,
reading the parameters of the model's own modules (the weights are never copied; the
training forward is untouched). `prefill` takes a chunk [length, b, hidden]: causal
attention within it, the Mamba mixer's own cached conv + chunked scan + gated norm from a
zero state, norms, MLPs and MoE on the tokens as rows. tests/test_inference.py holds
every path equal to the full forward.

Two variants of the steps that depend on the data:
- eager (default): attention over the filled positions only (no mask when every row is at
  the same position), and routed experts called only for the tokens routed to them (the
  routing is read on the host, one sync per MoE layer);
- static (`static=True`): fixed shapes and no host sync, so the whole step can be
  captured in a CUDA graph: attention over all `max_len` positions with a mask from the
  device positions, and every routed expert applied to every row with its routing weight
  (0 where not routed).

Linears run as `F.linear` on the module's weight unless the module's forward is wrapped
or hooked (fake quantization, quant/hooks.py): then the module itself is called, so the
wrapper quantizes exactly as in the full forward.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F


try:  # the single-step Mamba decode kernel (Triton); absent on CPU-only machines
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    HAVE_SELECTIVE_STATE_UPDATE = True
except Exception:  # ImportError, or a broken CUDA extension on import
    selective_state_update = None
    HAVE_SELECTIVE_STATE_UPDATE = False


class PrefillCaches:
    """What a prefill leaves per stateful layer (indexed by the layer's slot): keys and
    values [b, length, groups, head_dim] of each attention layer, conv inputs and SSM
    state of each Mamba layer; the decoder stores them in the prompts' slots."""

    def __init__(self, attention: int, mamba: int):
        self.keys, self.values = [None] * attention, [None] * attention
        self.conv, self.ssm = [None] * mamba, [None] * mamba


def is_wrapped(module) -> bool:
    """Is `module`'s forward replaced on the instance or hooked (then it must be called)?"""
    return "forward" in module.__dict__ or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


class Linear:
    """A Megatron Column/RowParallelLinear (one rank) as a function of [rows, in]."""

    __slots__ = ("module", "weight", "bias")

    def __init__(self, module):
        self.module = module
        self.weight = module.weight
        bias = getattr(module, "bias", None)
        self.bias = bias if isinstance(bias, torch.Tensor) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if is_wrapped(m):
            out, bias = m(x)
            return out if bias is None else out + bias
        return F.linear(x, self.weight, self.bias)


class Norm:
    """The local backend's RMSNorm (fp32 statistics, output in the input's dtype)."""

    __slots__ = ("weight", "eps", "shape")

    def __init__(self, module):
        self.weight, self.eps, self.shape = module.weight, module.eps, (module.weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.shape, self.weight.float(), self.eps).to(x.dtype)


class Mlp:
    """fc1 -> activation -> fc2 of a Megatron MLP (dense layer, shared or routed expert)."""

    __slots__ = ("fc1", "fc2", "act")

    def __init__(self, mlp, activation):
        self.fc1, self.fc2, self.act = Linear(mlp.linear_fc1), Linear(mlp.linear_fc2), activation

    def linears(self) -> list:
        return [self.fc1.module, self.fc2.module]

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        inter = self.act(self.fc1(x))
        if scale is not None:  # a routed expert: the routing weight scales its activation (Megatron's order)
            inter = (inter * scale).to(x.dtype)
        return self.fc2(inter)


class MambaStep:
    """norm -> in_proj -> causal conv step -> SSM recurrence step -> gated norm -> out_proj."""

    def __init__(self, layer, slot: int):
        mixer = layer.mixer
        self.mixer = mixer
        self.slot = slot  # index of this layer's conv/ssm cache in the decode state
        self.norm = Norm(layer.norm)
        self.in_proj, self.out_proj = Linear(mixer.in_proj), Linear(mixer.out_proj)
        self.heads, self.head_dim, self.groups = mixer.nheads_local_tp, mixer.headdim, mixer.ngroups_local_tp
        self.state_dim = mixer.d_state
        self.d_inner = mixer.d_inner_local_tp
        gd = self.groups * self.state_dim
        self.conv_dim = self.d_inner + 2 * gd
        self.split = [self.d_inner, self.conv_dim, self.heads]
        self.split_xbc = [self.d_inner, gd, gd]
        self.conv_weight = mixer.conv1d.weight[:, 0]  # a view: [conv_dim, kernel]
        self.conv_bias = mixer.conv1d.bias
        self.kernel = self.conv_weight.shape[-1]
        self.A_log, self.D = mixer.A_log, mixer.D
        self.gate_norm = mixer.norm  # GatedRMSNorm
        self.A = torch.empty_like(mixer.A_log, dtype=torch.float32)
        self.use_triton = None  # the kernel choice fixed by a compiled decoder (None: per call)
        self.refresh()

    def refresh(self) -> None:
        """Derived parameters, recomputed in place (a captured graph keeps reading them)."""
        with torch.no_grad():
            self.A.copy_(-torch.exp(self.A_log.float()))

    def linears(self) -> list:
        return [self.in_proj.module, self.out_proj.module]

    def prefill(self, h: torch.Tensor, caches: "PrefillCaches") -> torch.Tensor:
        """A chunk [length, b, hidden]: in_proj, the mixer's own cached conv + scan + gated
        norm (from a zero state; the final conv inputs and state go to `caches`), out_proj
        on the batch-first output. (The mixer's forward hands out_proj a transposed
        [length, b, d_inner] view; with weights that need no gradient, as a budget's views,
        torch.matmul then runs one matrix-vector product per position.)"""
        zxbcdt = self.in_proj(self.norm(h))
        y, caches.conv[self.slot], caches.ssm[self.slot] = self.mixer.mix_cached(zxbcdt.transpose(0, 1))
        return h + self.out_proj(y).transpose(0, 1)  # y: [b, length, d_inner]

    def _step(self, ssm, x, dt, B, C) -> torch.Tensor:
        """One step of the recurrence per head, in place on `ssm` [n, heads, head_dim, state]
        (fp32); heads grouped: head i reads group i // (heads / groups). y [n, d_inner]."""
        n = x.shape[0]
        g, hg, p, s = self.groups, self.heads // self.groups, self.head_dim, self.state_dim
        x32 = x.float().view(n, g, hg, p)
        ssm = ssm.view(n, g, hg, p, s)
        ssm.mul_(torch.exp(dt * self.A).view(n, g, hg, 1, 1))
        ssm.addcmul_((dt.view(n, g, hg, 1) * x32).unsqueeze(-1), B.float().view(n, g, 1, 1, s))
        y = torch.matmul(ssm, C.float().view(n, g, 1, s, 1)).squeeze(-1)  # [n, g, hg, p]
        return torch.addcmul(y, self.D.float().view(g, hg, 1), x32).view(n, self.d_inner)

    def _triton_step(self, ssm, x, dt, B, C) -> torch.Tensor:
        """The same step through mamba_ssm's selective_state_update kernel (CUDA, or CPU
        under Triton's interpreter)."""
        n, h, p, s = x.shape[0], self.heads, self.head_dim, self.state_dim
        # dt arrives limited and softplus'd (the mixer's _dt); the kernel still reads a dt_bias
        # (mamba_ssm 2.3 takes its strides unconditionally), so it gets zeros. Broadcast (stride
        # 0) dt, A and bias let the kernel compute one decay per head, not per channel.
        y = selective_state_update(
            ssm, x.view(n, h, p), dt[..., None].expand(-1, -1, p), self.A[:, None, None].expand(h, p, s),
            B.view(n, self.groups, s), C.view(n, self.groups, s), self.D.float()[:, None].expand(-1, p),
            dt_bias=self.A.new_zeros(()).expand(h, p), dt_softplus=False,
        )
        return y.view(n, self.d_inner)

    def cache_shape(self) -> tuple[int, int, int, int, int]:
        return (self.conv_dim, self.kernel - 1, self.heads, self.head_dim, self.state_dim)

    def __call__(self, h: torch.Tensor, state, step) -> torch.Tensor:
        n = h.shape[0]
        z, xbc, dt = torch.split(self.in_proj(self.norm(h)), self.split, dim=-1)
        # Causal depthwise conv over the last `kernel` inputs of each sequence.
        conv = state.conv[self.slot][:n]
        window = torch.cat([conv, xbc.unsqueeze(-1)], dim=-1)  # [n, conv_dim, kernel]
        conv.copy_(window[..., 1:])
        xbc = (window * self.conv_weight).sum(-1)
        if self.conv_bias is not None:
            xbc = xbc + self.conv_bias
        x, B, C = torch.split(F.silu(xbc), self.split_xbc, dim=-1)
        # One step of the recurrence per head (heads grouped: head i reads group i // per_group).
        dt = self.mixer._dt(dt)
        ssm = state.ssm[self.slot][:n]
        triton = self.use_triton if self.use_triton is not None else HAVE_SELECTIVE_STATE_UPDATE and self.mixer.use_triton(x)
        if triton:
            y = self._triton_step(ssm, x, dt, B, C)
        else:
            y = self._step(ssm, x, dt, B, C)
        # Gated RMSNorm within groups (of y in the model's dtype, as the scan returns it),
        # then the output projection and the residual.
        gn = self.gate_norm
        gated = y.to(h.dtype).float() * F.silu(z.float())
        gated = F.rms_norm(gated.view(n, -1, gn.group_size), (gn.group_size,), None, gn.eps).view(n, self.d_inner)
        return h + self.out_proj((gated * gn.weight.float()).to(h.dtype))


class AttentionStep:
    """norm -> linear_qkv -> append k, v to the cache -> attention over the cache -> linear_proj."""

    def __init__(self, layer, slot: int):
        attn = layer.self_attention
        self.slot = slot
        self.norm = Norm(layer.input_layernorm)
        self.qkv, self.proj = Linear(attn.linear_qkv), Linear(attn.linear_proj)
        self.groups = attn.num_query_groups_per_partition
        self.per_group = attn.num_attention_heads_per_partition // self.groups
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale

    def linears(self) -> list:
        return [self.qkv.module, self.proj.module]

    def prefill(self, h: torch.Tensor, caches: "PrefillCaches") -> torch.Tensor:
        """A chunk [length, b, hidden]: causal attention within it; its keys and values
        [b, length, groups, head_dim] go to `caches`."""
        n, b = h.shape[:2]
        g, hg, d = self.groups, self.per_group, self.head_dim
        qkv = self.qkv(self.norm(h)).view(n, b, g, hg + 2, d)
        q = qkv[:, :, :, :hg].reshape(n, b, g * hg, d).permute(1, 2, 0, 3)  # [b, heads, length, d]
        k, v = qkv[:, :, :, hg].transpose(0, 1), qkv[:, :, :, hg + 1].transpose(0, 1)  # [b, length, groups, d]
        caches.keys[self.slot], caches.values[self.slot] = k, v
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                                             enable_gqa=g != g * hg)
        return h + self.proj(out.permute(2, 0, 1, 3).reshape(n, b, g * hg * d))

    def cache_shape(self) -> tuple[int, int]:
        return (self.groups, self.head_dim)

    def __call__(self, h: torch.Tensor, state, step) -> torch.Tensor:
        n = h.shape[0]
        g, hg, d = self.groups, self.per_group, self.head_dim
        qkv = self.qkv(self.norm(h)).view(n, g, hg + 2, d)  # Megatron's layout: per group, its queries, key, value
        q, k, v = qkv[:, :, :hg], qkv[:, :, hg], qkv[:, :, hg + 1]
        keys, values = state.keys[self.slot], state.values[self.slot]
        if step.same_position is not None:  # every row at one position: write a slice, attend without a mask
            p = step.same_position
            keys[:n, :, p] = k
            values[:n, :, p] = v
            keys, values, mask = keys[:n, :, :p + 1], values[:n, :, :p + 1], None
        else:
            keys[step.rows, :, step.positions] = k
            values[step.rows, :, step.positions] = v
            keys, values, mask = keys[:n, :, :step.width], values[:n, :, :step.width], step.mask
        # The queries of a group share its key and value: they are that group's query "sequence".
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return h + self.proj(out.reshape(n, g * hg * d))


class MlpStep:
    def __init__(self, layer, activation):
        self.norm = Norm(layer.pre_mlp_layernorm)
        self.mlp = Mlp(layer.mlp, activation)

    def linears(self) -> list:
        return self.mlp.linears()

    def __call__(self, h: torch.Tensor, state, step) -> torch.Tensor:
        return h + self.mlp(self.norm(h))

    def prefill(self, h: torch.Tensor, caches=None) -> torch.Tensor:
        return self(h.view(-1, h.shape[-1]), None, None).view(h.shape)


class MoEStep:
    """Router (fp32 gate, sigmoid or softmax scores, expert bias, top-k, scaling) -> the
    routed experts of each token (weighted) + the shared expert."""

    def __init__(self, layer, activation):
        moe = layer.mlp
        c = moe.config
        self.norm = Norm(layer.pre_mlp_layernorm)
        self.router = moe.router
        self.topk = moe.router.topk
        self.score = c.moe_router_score_function
        self.scaling = c.moe_router_topk_scaling_factor
        self.router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(c.moe_router_dtype)
        self.experts = [Mlp(e, activation) for e in moe.experts.local_experts]
        self.shared = Mlp(moe.shared_experts, activation) if moe.shared_experts is not None else None
        self.handle = next(_MOE_HANDLES)  # how the compiled step's opaque op finds this layer
        _MOE_LAYERS[self.handle] = self

    def linears(self) -> list:
        return [m for mlp in self.experts + ([self.shared] if self.shared else []) for m in mlp.linears()]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, k], expert ids [n, k]) as Megatron's topk_routing_with_score_function."""
        r = self.router
        dtype = self.router_dtype or x.dtype
        logits = F.linear(x.to(dtype), r.weight.to(dtype), None if r.bias is None else r.bias.to(dtype))
        if self.score == "sigmoid":
            scores = torch.sigmoid(logits.float()).type_as(logits)
            bias = r.expert_bias
            chosen = torch.topk(scores if bias is None else scores + bias, self.topk, dim=1).indices
            weights = torch.gather(scores, 1, chosen)
            if self.topk > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            top, chosen = torch.topk(logits, self.topk, dim=1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        if self.scaling:
            weights = weights * self.scaling
        return weights, chosen

    def prefill(self, h: torch.Tensor, caches=None) -> torch.Tensor:
        """Every token of a chunk [length, b, hidden], as rows."""
        rows = h.view(-1, h.shape[-1])
        x = self.norm(rows)
        weights, chosen = self.route(x)
        out = self._routed(x, weights, chosen)
        if self.shared is not None:
            out = out + self.shared(x)
        return (rows + out).view(h.shape)

    def __call__(self, h: torch.Tensor, state, step) -> torch.Tensor:
        x = self.norm(h)
        weights, chosen = self.route(x)
        if step.static:
            out = self._every_expert(x, weights, chosen)
        elif step.compiled:  # which experts run is data: an opaque op in the compiled graph
            out = routed_experts(x, weights, chosen, self.handle)
        elif x.shape[0] == 1:
            out = self._one_token(x, weights, chosen)
        else:
            out = self._routed(x, weights, chosen)
        if self.shared is not None:
            out = out + self.shared(x)
        return h + out

    def _routed_eager(self, x, weights, chosen):
        return self._one_token(x, weights, chosen) if x.shape[0] == 1 else self._routed(x, weights, chosen)

    def _one_token(self, x, weights, chosen):
        out = None
        for j, e in sorted(enumerate(chosen[0].tolist()), key=lambda je: je[1]):  # Megatron sums experts in id order
            y = self.experts[e](x, weights[:, j:j + 1])
            out = y if out is None else out + y
        return out

    def _routed(self, x, weights, chosen):
        """Tokens sorted by expert (Megatron's permutation, without the dispatcher); each
        expert that received tokens runs once on them; outputs summed back per token."""
        n, k = chosen.shape
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token = order // k
        xs, ws = x[token], weights.flatten()[order].unsqueeze(-1)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self.experts[e](xs[start:start + c], ws[start:start + c]))
                start += c
        return torch.zeros_like(x).index_add_(0, token, torch.cat(outs))

    def _every_expert(self, x, weights, chosen):
        """Static shapes: every expert on every row, weighted by its routing weight (0 if not routed)."""
        dense = torch.zeros(x.shape[0], len(self.experts), dtype=weights.dtype, device=x.device).scatter(1, chosen, weights)
        out = None
        for e, expert in enumerate(self.experts):
            y = expert(x, dense[:, e:e + 1])
            out = y if out is None else out + y
        return out


# The compiled decode step runs the routed experts of a MoE layer as one opaque operator:
# which experts run depends on the data (a host sync), which a graph cannot hold, and a
# graph break inside the loop over layers would leave dynamo compiling each layer's call
# on its own (and recompiling it for every layer object).
_MOE_HANDLES = itertools.count()
_MOE_LAYERS: "weakref.WeakValueDictionary[int, MoEStep]" = weakref.WeakValueDictionary()


@torch.library.custom_op("elastic_megatron::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, layer: int) -> torch.Tensor:
    """The routed experts' weighted sum of MoE layer `layer` (its handle) for rows `x`."""
    return _MOE_LAYERS[layer]._routed_eager(x, weights, chosen)


@routed_experts.register_fake
def _(x, weights, chosen, layer):
    return torch.empty_like(x)


def check_moe_supported(config) -> None:
    """The routing options MoEStep reproduces; anything else is refused by name."""
    unsupported = {
        "moe_router_pre_softmax": False, "moe_router_num_groups": None, "moe_router_group_topk": None,
        "moe_expert_capacity_factor": None, "moe_router_force_load_balancing": False, "moe_input_jitter_eps": None,
        "moe_apply_probs_on_input": False, "moe_latent_size": None, "moe_shared_expert_gate": False,
        "moe_router_fusion": False,
    }
    for key, plain in unsupported.items():
        value = getattr(config, key, plain)
        if value not in (plain, None, False, 0):
            raise NotImplementedError(f"cached decoding does not reproduce {key}={value!r} (it supports the "
                                      f"project's model configs: {key}={plain!r})")
    if config.moe_router_score_function not in ("sigmoid", "softmax"):
        raise NotImplementedError(f"cached decoding: router score function {config.moe_router_score_function!r}")
