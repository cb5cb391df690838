"""``matched``: carry the adapter through maps fitted on the two models' own activations, on text
they generate themselves (no data, no training).

Both models read the same probe text; at the positions where their tokenizations end at the same
character their states describe the same prefix (``probe``). Per module, ``A_t`` is the ridge
regression of the adapter's input features on the target's inputs, and ``B_t = M B_s`` with ``M``
the least-squares map between the output spaces (q, k, v, gate, up) or a scaled isometry between
the residual streams in the coordinates each writer writes (o, down) (``fits``). Each role's
update is then sized by its effect on the probe text's likelihood (``calibrate``). Exact on
function-preserving twins up to the ridge. The reasoning and the measurements behind each choice
are in docs/methods.md ("matched") and docs/results.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from crosslora.arch.layout import ROLES, Layout
from crosslora.core import Inputs, ModuleResult
from crosslora.errors import CrossLoraError
from crosslora.io.pretrained import require_tokenizer
from crosslora.io.spool import Spool
from crosslora.linalg import safe_inverse
from crosslora.lora import LoraFactors
from crosslora.memory import MemoryNeed, gb, parameter_bytes
from crosslora.methods.base import (
    Calibration,
    Method,
    MethodOutput,
    ModuleContext,
    Params,
    Prepared,
    register,
)
from crosslora.methods.matched import calibrate as cal
from crosslora.methods.matched.fits import (
    Probe,
    Ridge,
    map_output,
    median_rms,
    out_fit,
    output,
    procrustes,
    rel,
)
from crosslora.methods.matched.probe import (
    INPUT_SPACE,
    Activations,
    ProbeBatch,
    activation_bytes,
    align,
    collect,
    input_widths,
    load_model,
    readable,
    sample_texts,
    special_id,
)

log = logging.getLogger("crosslora")

RUNTIME_BYTES = 1 << 30  # torch, the tokenizers, the forward passes: what `memory` does not count
POST_NORM = {"o": "post_attn_norm", "down": "post_mlp_norm"}  # family fields (Gemma 2/3)
SAMPLED_PER_KEPT = 1.3  # probe texts sampled per text kept, on average (the plan's time estimate)


@dataclass(frozen=True)
class MatchedParams(Params):
    alpha: float = 1e-2  # ridge, relative to the mean eigenvalue of the Gram matrix
    n_texts: int = 64  # probe texts, half sampled from each model
    calibration_texts: int = 32  # of which the calibration reads (about 2,700 chunks)
    text_tokens: int = 96  # new tokens per probe text
    seed: int = 0
    draw_stride: int = 100  # draw i samples its probe text with seed seed + draw_stride · i
    min_positions: int = 256  # aligned positions needed to fit the maps


@dataclass
class MatchedPair(Prepared):
    """One run's probe of the two models: the activations at the aligned positions (freed once
    the maps are done), what the calibration reads, and the fits of the current layer."""

    acts_s: Activations | None = None
    acts_t: Activations | None = None
    paths: tuple[Path, Path] | None = None
    pads: tuple[int, int] = (0, 0)
    batches: tuple[ProbeBatch, ProbeBatch] | None = None
    device: torch.device = torch.device("cpu")
    models: tuple | None = None  # reloaded for the calibration, once the activations are freed
    base_ll: tuple[torch.Tensor, torch.Tensor] | None = None  # the bases' chunk log-likelihoods
    fits: dict[tuple, tuple[int | None, int, object]] = field(default_factory=dict)


@register
class Matched(Method):
    name = "matched"
    recovered = 0.297  # docs/results.md, the six-pair table
    params_type = MatchedParams
    default_layer_map = "merge"
    then = "calibrate each role's update by its effect on the probe text's likelihood"
    draws = True
    params: MatchedParams

    def for_draw(self, draw: int) -> Matched:
        p = self.params
        return Matched(replace(p, seed=p.seed + p.draw_stride * draw)) if draw else self

    def memory(self, src: Layout, tgt: Layout, device: torch.device) -> MemoryNeed:
        """Both models in float32 while the probe text is sampled and read and while the
        calibration scores it (with the logits of 4 texts of up to twice ``text_tokens`` tokens,
        and a copy); the activations at its positions (at most about ``n_texts × text_tokens``)
        parked on disk beside the output (``prepare``), of which one module's are read back at a
        time, with their float64 copies and one layer's fits. On a GPU the models, the logits
        and the fits live there. SmolLM2 → Qwen2.5: 5.1 GB estimated, 4.85 GB peak RSS."""
        p = self.params
        m_s, m_t = parameter_bytes(src.checkpoint), parameter_bytes(tgt.checkpoint)
        positions = p.n_texts * p.text_tokens
        a_s, a_t = activation_bytes(src, positions), activation_bytes(tgt, positions)
        fits = _fit_bytes(src, tgt)
        logits = 2 * 4 * (4 * 2 * p.text_tokens) * max(src.dims.vocab, tgt.dims.vocab)
        module = 3 * (max(a_s) + max(a_t))  # a layer's rows, float32 and float64, on each side
        disk = sum(a_s) + sum(a_t)
        what = (f"both models in float32, {gb(m_s + m_t)}, with logits, {gb(logits)}, or one "
                f"layer's activations and fits, {gb(module + fits)}; the activations at "
                f"{positions} probe positions, {gb(disk)}, wait on disk")  # fmt: skip
        if device.type == "cpu":
            peak = max(m_s + m_t + logits, module + fits)
            return MemoryNeed(peak + RUNTIME_BYTES, 0, what, disk)
        device_peak = max(m_s + m_t + logits, fits)
        return MemoryNeed(max(m_s, m_t, module) + RUNTIME_BYTES, device_peak, what, disk)

    def flops(
        self, src: Layout, tgt: Layout, shapes: list[tuple[tuple[int, int], tuple[int, int]]],
        truncation_rank: int | None,
    ) -> float:  # fmt: skip
        """Sampling the probe text, reading it (both models), the fits (per module: the Gram
        matrices and Cholesky factors of what it reads and writes) and the calibration's passes
        (the source twice, the target 4 + 7 roles times, over the calibration texts)."""
        p = self.params
        w_s, w_t = parameter_bytes(src.checkpoint, 1), parameter_bytes(tgt.checkpoint, 1)
        tokens = p.n_texts * p.text_tokens
        sample = 2 * (w_s + w_t) * tokens / 2 * SAMPLED_PER_KEPT
        read = 2 * (w_s + w_t) * tokens
        calibrate = 2 * (2 * w_s + 11 * w_t) * p.calibration_texts * p.text_tokens
        fits = sum(2 * tokens * (n_t**2 + m_s**2) + (n_t**3 + m_s**3) / 3
                   for (m_s, _), (_, n_t) in shapes)  # fmt: skip
        return sample + read + calibrate + fits

    def prepare(
        self, src: Layout, tgt: Layout, device: torch.device, spool: Spool | None = None
    ) -> MatchedPair:
        p = self.params
        tok_s = require_tokenizer(src.checkpoint.path, "source model")
        tok_t = require_tokenizer(tgt.checkpoint.path, "target model")
        model_s = load_model(src.checkpoint.path, device, "source model")
        model_t = load_model(tgt.checkpoint.path, device, "target model")
        texts = probe_texts(model_s, tok_s, model_t, tok_t, p.n_texts, p.seed, p.text_tokens,
                            bars=log.isEnabledFor(logging.INFO))  # fmt: skip
        batch_s, batch_t = align(texts, tok_s, tok_t)
        n = sum(len(pos) for pos in batch_s.positions)
        if n < p.min_positions:
            raise CrossLoraError(
                f"only {n} positions of the probe text align between the two tokenizers "
                f"(need {p.min_positions}); the matched method cannot fit its maps"
            )
        pads = (special_id(tok_s, "pad", "eos", "bos") or 0,
                special_id(tok_t, "pad", "eos", "bos") or 0)  # fmt: skip
        acts_s = collect(model_s, src, batch_s, pads[0], spool=spool)
        del model_s
        acts_t = collect(model_t, tgt, batch_t, pads[1], spool=spool)
        del model_t
        keep = slice(None, None, p.n_texts // p.calibration_texts)  # half from each model
        batches = tuple(ProbeBatch(b.ids[keep], b.positions[keep]) for b in (batch_s, batch_t))
        diagnostics = {"probe_seed": p.seed, "probe_texts": len(texts), "probe_positions": n,
                       "probe_tokens_source": sum(len(i) for i in batch_s.ids),
                       "probe_tokens_target": sum(len(i) for i in batch_t.ids)}  # fmt: skip
        return MatchedPair(diagnostics, acts_s, acts_t, (src.checkpoint.path, tgt.checkpoint.path),
                           pads, batches, device)  # fmt: skip

    def calibrate(
        self, inputs: Inputs, results: list[ModuleResult], pair: MatchedPair
    ) -> Calibration:
        """Scale each role's transferred update so that, together, they change the target's
        log-likelihood of the probe text as the source adapter changes the source's
        (``calibrate``). Returns the scales and the measured agreement."""
        from tqdm.auto import tqdm

        pair.acts_s = pair.acts_t = None  # the maps are done: free the activations
        pair.fits = {}
        assert pair.paths and pair.batches
        if pair.models is None:
            pair.models = (load_model(pair.paths[0], pair.device, "source model"),
                           load_model(pair.paths[1], pair.device, "target model"))  # fmt: skip
        model_s, model_t = pair.models
        (batch_s, batch_t), (pad_s, pad_t) = pair.batches, pair.pads
        done = [r for r in results if r.skipped is None]
        roles = sorted({r.task.tgt.role for r in done}, key=ROLES.index)
        fresh = pair.base_ll is None
        bar = tqdm(total=2 * fresh + 4 + len(roles), desc="calibrate (matched)", unit="pass",
                   disable=not log.isEnabledFor(logging.INFO))  # fmt: skip

        def ll(model, batch, pad, updates=()):
            with cal.applied(model, updates):
                out = cal.chunk_loglik(model, batch, pad)
            bar.update()
            return out

        with bar:
            if fresh:
                pair.base_ll = (ll(model_s, batch_s, pad_s), ll(model_t, batch_t, pad_t))
            base_s, base_t = pair.base_ll
            d_s = ll(model_s, batch_s, pad_s, _source_updates(inputs, results)) - base_s
            role_of = [r.task.tgt.role for r in done]
            updates = [_target_update(r) for r in done]
            full = ll(model_t, batch_t, pad_t, updates) - base_t
            slopes = torch.stack([  # each role's part: the effect lost when it alone is left out
                full - (ll(model_t, batch_t, pad_t,
                           [u for u, ro in zip(updates, role_of) if ro != role]) - base_t)
                for role in roles
            ])  # fmt: skip
            scales = cal.fit_scales(d_s, full, slopes)
            stages = [[float(scales[roles.index(ro)])] for ro in role_of]
            _rescale(updates, [c for (c,) in stages])
            after = ll(model_t, batch_t, pad_t, updates) - base_t
            least_squares = cal.agreement(d_s, after)
            size = cal.disattenuation(least_squares["corr"])
            if size != 1.0:  # else the least-squares effect is the final one
                _rescale(updates, [size] * len(done))
                for stage in stages:
                    stage.append(size)
                after = ll(model_t, batch_t, pad_t, updates) - base_t
            else:
                bar.update()
        scales = scales * size
        eff = cal.agreement(d_s, after)
        log.info(
            "calibrated by the effect on the probe text (scales %s, of which %.2f for the "
            "least-squares attenuation); the transferred adapter explains %.0f%% of the source "
            "adapter's effect there (correlation %.2f)",
            ", ".join(f"{r} {float(c):.2f}" for r, c in zip(roles, scales)), size,
            100 * eff["explained"], eff["corr"],
        )  # fmt: skip
        per_done = iter(zip(stages, role_of))
        out_scales: list[tuple[float, ...]] = []
        module_diagnostics: list[dict] = []
        for res in results:
            if res.skipped is not None:
                out_scales.append(())
                module_diagnostics.append({})
                continue
            stage, role = next(per_done)
            out_scales.append(tuple(stage))
            module_diagnostics.append({"calibration": round(float(scales[roles.index(role)]), 4)})
        return Calibration(out_scales, module_diagnostics, {
            "calibration": {role: round(float(c), 4) for role, c in zip(roles, scales)},
            "disattenuation": round(size, 4),
            "probe_chunks": len(d_s),
            "probe_effect_before": cal.agreement(d_s, full),
            "probe_effect_least_squares": least_squares,
            "probe_effect": eff,
        })  # fmt: skip

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, pair: MatchedPair) -> MethodOutput:
        assert ctx.src and ctx.tgt and pair.acts_s and pair.acts_t
        role, ls, lt = ctx.src.role, ctx.src.layer, ctx.tgt.layer
        space, dev, alpha = INPUT_SPACE[role], pair.device, self.params.alpha
        x_s = pair.acts_s.inputs[(ls, space)].to(dev)
        x_t = pair.acts_t.inputs[(lt, space)].to(dev)
        A, B = lora.A.to(dev), lora.B.to(dev)
        # the base modules' outputs on the probe, (N, m): the q/k/v output spaces, the sizes
        src = Probe(x_s, x_s @ ctx.src_weight().to(dev).mT)
        tgt = Probe(x_t, x_t @ ctx.tgt_weight().to(dev).mT)
        feats = x_s.double() @ A.double().mT  # (N, r): what the adapter reads on the source
        ridge_t = _fit(pair, ("in", lt, space), lambda: Ridge(x_t, alpha), None, lt)
        a_t = ridge_t.solve(x_t.double().mT @ feats).mT  # (r, n_t)
        in_fit = rel(x_t.double() @ a_t.mT, feats)
        if role in ("o", "down"):
            return self._residual_write(lora, ctx, pair, a_t, in_fit, src, tgt)
        if role in ("gate", "up"):  # the neuron space: its activations span all of it
            y_s = pair.acts_s.inputs[(ls, "mlp_mid")].to(dev)
            y_t = pair.acts_t.inputs[(lt, "mlp_mid")].to(dev)
            ridge = _fit(pair, ("mid", ls, lt), lambda: Ridge(y_s, alpha), ls, lt)
        else:
            y_s, y_t = src.y, tgt.y
            ridge = Ridge(y_s, alpha)
        b_t = map_output(y_s, y_t, ridge, B)
        return output(a_t, b_t, lora, src, tgt, in_fit, out_fit(y_s, y_t, ridge))

    def _residual_write(self, lora: LoraFactors, ctx: ModuleContext, pair: MatchedPair, a_t,
                        in_fit: float, src: Probe, tgt: Probe) -> MethodOutput:  # fmt: skip
        """o and down: ``B_t = M B_s``, ``M`` the Procrustes map between the two sides' write
        coordinates (docs/methods.md)."""
        assert ctx.src and ctx.tgt and ctx.src_layout and ctx.tgt_layout
        ls, lt, role = ctx.src.layer, ctx.tgt.layer, ctx.src.role
        g_s = ctx.src_layout.norm_gain(POST_NORM[role], ls)
        g_t = ctx.tgt_layout.norm_gain(POST_NORM[role], lt)
        post_norm = g_s is not None or g_t is not None  # without, o and down share the map
        m, fit = _fit(pair, ("res", ls, lt, role if post_norm else None), lambda: procrustes(
            _write_coords(pair, pair.acts_s, ctx.src_layout, ls, g_s, src),
            _write_coords(pair, pair.acts_t, ctx.tgt_layout, lt, g_t, tgt),
        ), ls, lt)  # fmt: skip
        b_t = m @ lora.B.to(pair.device).double()
        return output(a_t, b_t, lora, src, tgt, in_fit, fit)


def _fit(pair: MatchedPair, key: tuple, make, ls: int | None, lt: int):
    """A fit shared by the modules (and adapters) that use the same activations: of target layer
    ``lt``, and of source layer ``ls`` unless None. Modules come in layer order, so a fit of
    another layer is not needed again: it is dropped, and one layer's fits at most are held
    (``Matched.memory``)."""
    for k in [k for k, (l_s, l_t, _) in pair.fits.items()
              if l_t != lt or (l_s is not None and l_s != ls)]:  # fmt: skip
        del pair.fits[k]
    if key not in pair.fits:
        pair.fits[key] = (ls, lt, make())
    return pair.fits[key][2]


def _write_coords(pair: MatchedPair, acts: Activations, layout: Layout, layer: int, g,
                  p: Probe) -> torch.Tensor:  # fmt: skip
    """The residual stream after ``layer`` (N, d) in the coordinates its writer (output ``p.y``)
    writes: ``S⁻¹ h``, ``S = diag(g) / rms(y)``, behind a post-norm of gain ``g``; else ``h``.
    After the last layer: its own input."""
    h = acts.residual[min(layer + 1, layout.num_layers - 1)].to(pair.device)
    if g is None:
        return h
    return h.double() * (safe_inverse(g).to(pair.device).double() * median_rms(p.y))


def _fit_bytes(src: Layout, tgt: Layout) -> int:
    """The float64 fits ``_fit`` holds for one layer at most: the target's ridge factors for every
    input space it reads, the source's for its MLP neurons, and the writers' two maps."""

    def squares(layout: Layout, spaces: set[str]) -> int:
        per_layer = [0] * layout.num_layers
        for (layer, space), n in input_widths(layout).items():
            per_layer[layer] += n * n if space in spaces else 0
        return max(per_layer, default=0)

    maps = 2 * src.dims.hidden * tgt.dims.hidden
    return 8 * (squares(tgt, set(INPUT_SPACE.values())) + squares(src, {"mlp_mid"}) + maps)


def probe_texts(model_s, tok_s, model_t, tok_t, n: int, seed: int, tokens: int,
                bars: bool = False) -> list[str]:  # fmt: skip
    """``n`` probe texts: the first half sampled from the source model (``seed``), the rest from
    the target (``seed + 1``), ``tokens`` new tokens each, each one both models can read
    (``probe.readable``; fewer when a model's samples rarely are); progress bars when
    ``bars``."""
    half = n // 2
    desc_s, desc_t = ("probe text (source)", "probe text (target)") if bars else (None, None)

    def keep(text: str) -> bool:
        return readable(text, tok_s, tok_t)

    return sample_texts(model_s, tok_s, half, tokens, seed, desc=desc_s, keep=keep) + (
        sample_texts(model_t, tok_t, n - half, tokens, seed + 1, desc=desc_t, keep=keep)
    )


def _rescale(updates: list[cal.Update], factors: list[float]) -> None:
    """Multiply each update's ``B`` by its factor, in place (the results' factors are the
    executor's to change)."""
    for u, c in zip(updates, factors):
        u.B = u.B * c


def _source_updates(inputs, results) -> list[cal.Update]:
    """The source adapter's update of every source role the plan reads, once each."""
    seen: dict[tuple, cal.Update] = {}
    for res in results:
        src = res.task.src
        key = (src.slot.module, src.role)
        if key not in seen:
            lora = inputs.adapter.factors(res.task.adapter_module).to("cpu")
            rows = src.slot.rows[src.role]
            B = lora.B if rows is None else lora.B[rows]
            seen[key] = cal.Update(src.slot.module, rows, lora.A, B, lora.scale)
    return list(seen.values())


def _target_update(res) -> cal.Update:
    tgt, f = res.task.tgt, res.factors
    return cal.Update(tgt.slot.module, tgt.slot.rows[tgt.role], f.A, f.B, f.scale)
