"""Function-preserving twins: a target that computes exactly the source's function in other
coordinates (docs/methods.md: the exactness test every construction must pass).

From a source model (llama, qwen2 or gemma3_text family) build a target whose
- residual stream is zero-widened by ``widen`` dimensions and rotated by a random orthogonal
  matrix (norm gains folded into the adjacent weights so that RMSNorm commutes with the rotation;
  the √(d/d') factor corrects the RMS over the wider stream);
- attention heads are permuted consistently within KV groups (KV heads permuted, then the q heads
  of each group);
- MLP neurons are zero-widened by ``widen_mlp`` and permuted.

Gemma's post-norms act on a module's output before the residual add and cannot be folded, so the
source's post-norm gains are first made uniform per layer (``twin_ready``).
"""

from __future__ import annotations

import math

import torch
import transformers as tf


def twin_ready(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make post-norm gains uniform per norm (a scalar each), so the model has exact twins.

    Also makes RMSNorm's ε negligible: with ε comparable to the tiny models' mean square, the
    wider stream's smaller mean square would change the norm's output by more than 1e-4.
    """
    model.config.rms_norm_eps = 1e-12
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if hasattr(module, attr) and isinstance(getattr(module, attr), float):
                setattr(module, attr, 1e-12)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                if model.config.model_type.startswith("gemma"):
                    p.fill_(float(torch.rand((), generator=g)) * 0.5)
    return model


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _head_perm(
    heads: int, kv: int, hd: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row orders for q and k/v projections: KV heads permuted, q heads permuted within groups."""
    group = heads // kv
    kv_order = torch.randperm(kv, generator=g)
    q_heads = [
        int(kv_order[j]) * group + int(i)
        for j in range(kv)
        for i in torch.randperm(group, generator=g)
    ]
    rows = lambda order: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in order])  # noqa: E731
    return rows(q_heads), rows(kv_order.tolist())


def make_twin(
    source: torch.nn.Module, widen: int = 8, widen_mlp: int = 8, seed: int = 0
) -> torch.nn.Module:
    cfg = source.config
    mt = cfg.model_type
    gemma = mt.startswith("gemma")
    offset = 1.0 if gemma else 0.0
    d, inter = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    dt, it = d + widen, inter + widen_mlp
    g = torch.Generator().manual_seed(seed)
    M = _orthogonal(dt, g)[:, :d]  # (d', d): target residual = M · source residual
    c = math.sqrt(d / dt)  # RMS over d' dims of a padded vector is √(d/d') of the RMS over d
    sd = {k: v.double() for k, v in source.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    gain = lambda key: sd[key] + offset  # noqa: E731
    unit = lambda n: torch.full((n,), 1.0 - offset, dtype=torch.float64)  # noqa: E731  (gain 1)

    emb_scale = c if gemma else 1.0  # Gemma multiplies embeddings by √hidden
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ M.T * emb_scale
    out["lm_head.weight"] = sd["lm_head.weight"] * gain("model.norm.weight") @ M.T * c
    out["model.norm.weight"] = unit(dt)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q_rows, kv_rows = _head_perm(heads, kv, hd, g)
        neurons = torch.randperm(it, generator=g)
        g_in = gain(p + "input_layernorm.weight")
        mlp_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
        g_mlp = gain(p + f"{mlp_norm}.weight")
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[p + f"self_attn.{name}.weight"] = (
                sd[p + f"self_attn.{name}.weight"] * g_in @ M.T * c
            )[rows]
            if p + f"self_attn.{name}.bias" in sd:
                out[p + f"self_attn.{name}.bias"] = sd[p + f"self_attn.{name}.bias"][rows]
        out[p + "self_attn.o_proj.weight"] = M @ sd[p + "self_attn.o_proj.weight"][:, q_rows]
        for name in ("gate_proj", "up_proj"):
            w = sd[p + f"mlp.{name}.weight"] * g_mlp @ M.T * c
            out[p + f"mlp.{name}.weight"] = torch.cat([w, w.new_zeros(widen_mlp, dt)])[neurons]
        down = M @ sd[p + "mlp.down_proj.weight"]
        out[p + "mlp.down_proj.weight"] = torch.cat([down, down.new_zeros(dt, widen_mlp)], 1)[
            :, neurons
        ]
        out[p + "input_layernorm.weight"] = unit(dt)
        out[p + f"{mlp_norm}.weight"] = unit(dt)
        if gemma:  # uniform post-norm gains, rescaled for the wider RMS
            for post in ("post_attention_layernorm", "post_feedforward_layernorm"):
                out[p + f"{post}.weight"] = gain(p + f"{post}.weight") * c - offset
                out[p + f"{post}.weight"] = out[p + f"{post}.weight"][:1].expand(dt).clone()
        for name in (
            "q_norm",
            "k_norm",
        ):  # per-head norms: head permutations leave them as they are
            if p + f"self_attn.{name}.weight" in sd:
                out[p + f"self_attn.{name}.weight"] = sd[p + f"self_attn.{name}.weight"]
    config = cfg.__class__(
        **{**cfg.to_dict(), "hidden_size": dt, "intermediate_size": it, "head_dim": hd}
    )
    twin = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = set(twin.state_dict()) - set(out)
    assert not missing, f"twin builder does not know {sorted(missing)[:4]}"
    twin.load_state_dict({k: v.float() for k, v in out.items()}, strict=True)
    return twin.eval()
