"""``anchored``: map every module's input and output space between the two models, anchoring
the residual stream in the shared vocabulary and each internal space in the base weights.

Per layer pair, in effective coordinates (norm gains folded in, see ``spaces``), with
``R`` (d_s × d_t) mapping target residual coordinates to source ones and ``Q`` (d_t × d_s) the
reverse:

- q, k, v (read the residual, write a head space):
  ``T = W̃_t (W̃_s R)⁺``, ``A_t = A_s diag(g_s) R diag(g_t)⁻¹``, ``B_t = T B_s``;
- o (reads the attention output, writes the residual):
  ``T_in = (Q W̃_s)⁺ W̃_t``, ``A_t = A_s T_in``, ``B_t = diag(p_t)⁻¹ Q diag(p_s) B_s``;
- gate, up, down share the MLP intermediate space, which one weight alone cannot pin down (it is
  wider than the residual). Its map ``N`` (I_t × I_s) is fitted once per layer pair from every
  weight that touches it: each neuron's gate row, up row and down column, all in target residual
  coordinates, each block scaled to unit norm per model, stacked into a signature;
  ``N = F_t F_s⁺``. Then ``B_t = N B_s`` for gate and up,
  and ``A_t = A_s Nᵀ`` for down (the least-squares map for the columns, ``(F_sᵀ)⁺ F_tᵀ``).

Pseudo-inverses are rank-truncated and computed in float64. Exact on function-preserving twins
(rotated, permuted, zero-widened): the maps then recover the rotation and permutations.

Magnitude: each module's update is rescaled so that ``‖ΔW̃‖ / ‖W̃‖`` on the target equals its
value on the source (``calibration`` in the report). On twins this factor is 1; on real pairs it
keeps an arbitrary residual-stream scale (Gemma's √d embeddings, large norm gains) from wrecking
the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from crosslora.arch.layout import ROLE_SPACES, Layout
from crosslora.io.pretrained import require_tokenizer
from crosslora.io.spool import Spool
from crosslora.linalg import safe_inverse
from crosslora.lora import LoraFactors
from crosslora.methods.anchored.spaces import ResidualMaps, fit_residual_maps, pinv, rel_residual
from crosslora.methods.anchored.vocab import shared_vocab
from crosslora.methods.base import (
    Method,
    MethodOutput,
    ModuleContext,
    Params,
    Prepared,
    Unsupported,
    register,
)

IN_NORM = {
    "q": "attn_norm",
    "k": "attn_norm",
    "v": "attn_norm",
    "gate": "mlp_norm",
    "up": "mlp_norm",
}
POST_NORM = {"o": "post_attn_norm", "down": "post_mlp_norm"}


def _frob(x: torch.Tensor) -> float:
    return float(x.norm())


@dataclass(frozen=True)
class AnchoredParams(Params):
    rcond: float = 1e-4  # internal maps: singular values below rcond · σ_max are dropped


@dataclass
class AnchoredPair(Prepared):
    """The residual maps of one pair of models, and the layer pair's MLP map once fitted."""

    maps: ResidualMaps | None = None
    device: torch.device = torch.device("cpu")
    mlp: dict[tuple[int, int], tuple[torch.Tensor, float]] = field(default_factory=dict)


@register
class Anchored(Method):
    name = "anchored"
    params_type = AnchoredParams
    default_layer_map = "depth"
    params: AnchoredParams

    def prepare(
        self, src: Layout, tgt: Layout, device: torch.device, spool: Spool | None = None,
        cache: object = None,
    ) -> AnchoredPair:  # fmt: skip
        vocab = shared_vocab(
            require_tokenizer(src.checkpoint.path, "source model"),
            require_tokenizer(tgt.checkpoint.path, "target model"),
        )
        maps = fit_residual_maps(src, tgt, vocab.src_ids, vocab.tgt_ids)
        diagnostics = {"source_vocab": vocab.src_size, "target_vocab": vocab.tgt_size,
                       **maps.diagnostics}  # fmt: skip
        return AnchoredPair(diagnostics, maps, device)

    def module_maps(self, ctx: ModuleContext, pair: AnchoredPair) -> ModuleMaps:
        """The maps for one (source role, target role) pair; no adapter needed."""
        assert ctx.src and ctx.tgt and ctx.src_layout and ctx.tgt_layout and pair.maps
        src, tgt, role = ctx.src_layout, ctx.tgt_layout, ctx.src.role
        ls, lt = ctx.src.layer, ctx.tgt.layer
        dev, rcond = pair.device, self.params.rcond
        R, Q = (m.to(dev) for m in pair.maps.at(ls / max(src.num_layers - 1, 1)))
        w_s = ctx.src_weight().to(dev, torch.float64)
        w_t = ctx.tgt_weight().to(dev, torch.float64)
        if ROLE_SPACES[role][0] == "residual":  # q k v gate up: the input side is the residual
            g_s, g_t = _gain(src, IN_NORM[role], ls, dev), _gain(tgt, IN_NORM[role], lt, dev)
            ew_s, ew_t = w_s * g_s, w_t * g_t
            if role in ("gate", "up"):
                T, fit = self._neuron_map(ctx, pair, R, Q)
            else:
                T = ew_t @ pinv(ew_s @ R, rcond)
                fit = rel_residual(T @ ew_s @ R, ew_t)
            in_map = (g_s[:, None] * R) * safe_inverse(g_t)
            return ModuleMaps(T, in_map, fit, (None, g_s), (None, g_t), _frob(ew_s), _frob(ew_t))
        p_s, p_t = _gain(src, POST_NORM[role], ls, dev), _gain(tgt, POST_NORM[role], lt, dev)
        ew_s, ew_t = p_s[:, None] * w_s, p_t[:, None] * w_t
        if role == "down":
            N, fit = self._neuron_map(ctx, pair, R, Q)
            T_in = N.mT
        else:
            T_in = pinv(Q @ ew_s, rcond) @ ew_t
            fit = rel_residual(Q @ ew_s @ T_in, ew_t)
        out_map = safe_inverse(p_t)[:, None] * Q * p_s
        return ModuleMaps(out_map, T_in, fit, (p_s, None), (p_t, None), _frob(ew_s), _frob(ew_t))

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, pair: AnchoredPair) -> MethodOutput:
        maps = self.module_maps(ctx, pair)
        A, B = lora.A.to(pair.device, torch.float64), lora.B.to(pair.device, torch.float64)
        a_t, b_t = A @ maps.in_map, maps.out_map @ B
        ratio_s = _effective_norm(B, A, maps.src_gains) / maps.src_weight_norm
        delta_t = _effective_norm(b_t, a_t, maps.tgt_gains)
        if not delta_t > 0 or delta_t == float("inf"):
            raise Unsupported("the mapped update vanished (the maps have no overlap with it)")
        calibration = ratio_s * maps.tgt_weight_norm / delta_t
        out = LoraFactors(a_t.float(), (b_t * calibration).float(), lora.scale)
        return MethodOutput(
            out,
            {"fit_residual": round(maps.fit, 6), "calibration": round(calibration, 6),
             "relative_update": round(ratio_s, 6)},
        )  # fmt: skip

    def _neuron_map(self, ctx: ModuleContext, pair: AnchoredPair, R: torch.Tensor,
                    Q: torch.Tensor):  # fmt: skip
        """``N`` (I_t × I_s) for the layer pair's MLP intermediate space, and its fit residual."""
        key = (ctx.src.layer, ctx.tgt.layer)
        if key not in pair.mlp:
            pair.mlp = {key: self._fit_neuron_map(ctx, pair.device, R, Q)}  # one pair at a time
        return pair.mlp[key]

    def _signature(self, layout: Layout, layer: int, device: torch.device, to_tgt_in,
                   to_tgt_out) -> list[torch.Tensor]:  # fmt: skip
        """Per-neuron blocks [gate row, up row, down column], each in target residual coords."""
        blocks = []
        for role in ("gate", "up", "down"):
            ref = layout.role(layer, role)
            if ref is None:
                continue
            w = layout.weight(ref, device).double()
            if role == "down":
                w = _gain(layout, POST_NORM[role], layer, device)[:, None] * w
                blocks.append(to_tgt_out(w).mT)  # (I, d_t)
            else:
                w = w * _gain(layout, IN_NORM[role], layer, device)
                blocks.append(to_tgt_in(w))  # (I, d_t)
        return blocks

    def _fit_neuron_map(self, ctx: ModuleContext, device: torch.device, R: torch.Tensor,
                        Q: torch.Tensor):  # fmt: skip
        src, tgt = ctx.src_layout, ctx.tgt_layout
        f_s = self._signature(src, ctx.src.layer, device, lambda w: w @ R, lambda w: Q @ w)
        f_t = self._signature(tgt, ctx.tgt.layer, device, lambda w: w, lambda w: w)
        if len(f_s) != len(f_t):
            raise Unsupported("the two MLPs have different kinds of weights (gated vs not)")
        # each block at unit norm on each side: a block's overall scale (the gate rows', say) is a
        # property of the model, not of the neuron correspondence
        f_s = torch.cat([b / b.norm().clamp_min(1e-30) for b in f_s], dim=1)
        f_t = torch.cat([b / b.norm().clamp_min(1e-30) for b in f_t], dim=1)
        N = f_t @ pinv(f_s, self.params.rcond)
        return N, rel_residual(N @ f_s, f_t)


def alignment(
    src: Layout, tgt: Layout, pairs: list[tuple[int, int, str]], device: torch.device
) -> tuple[dict, Iterator[float]]:
    """What the anchored maps see, with no adapter: the residual maps' diagnostics, and per
    (source layer, target layer, role) of ``pairs`` the relative residual of the mapped source
    weight against the target's (0: the same module in other coordinates), computed as iterated.
    """
    method = Anchored()
    pair = method.prepare(src, tgt, device)

    def fits() -> Iterator[float]:
        for ls, lt, role in pairs:
            s_ref, t_ref = src.role(ls, role), tgt.role(lt, role)
            assert s_ref is not None and t_ref is not None
            ctx = ModuleContext(
                s_ref.shape, t_ref.shape, device, None,
                lambda r=s_ref: src.weight(r, device), lambda r=t_ref: tgt.weight(r, device),
                s_ref, t_ref, src, tgt,
            )  # fmt: skip
            yield method.module_maps(ctx, pair).fit

    return pair.diagnostics, fits()


def _gain(layout: Layout, field: str, layer: int, device: torch.device) -> torch.Tensor:
    """Effective norm gain for a role (ones where the family has no such norm)."""
    g = layout.norm_gain(field, layer)
    return (torch.ones(layout.dims.hidden, dtype=torch.float64) if g is None else g).to(device)


def _effective_norm(B: torch.Tensor, A: torch.Tensor, gains: tuple) -> float:
    """‖diag(out) B A diag(in)‖_F without forming B A (a gain of None is all ones)."""
    out, inp = gains
    B = B if out is None else out[:, None] * B
    A = A if inp is None else A * inp
    return LoraFactors(A, B, 1.0).frobenius()


@dataclass
class ModuleMaps:
    """``ΔW_t = out_map ΔW_s in_map`` before calibration, in the models' own coordinates.

    ``*_gains`` are the (output, input) norm gains that give effective coordinates,
    ``ΔW̃ = diag(out) ΔW diag(in)``; ``*_weight_norm`` are ‖W̃‖ of the two base weights.
    """

    out_map: torch.Tensor  # (m_t, m_s)
    in_map: torch.Tensor  # (n_s, n_t)
    fit: float  # relative residual of the target weight explained by the mapped source weight
    src_gains: tuple[torch.Tensor | None, torch.Tensor | None]
    tgt_gains: tuple[torch.Tensor | None, torch.Tensor | None]
    src_weight_norm: float
    tgt_weight_norm: float
