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
import shutil
from dataclasses import dataclass, field, replace

import torch

from crosslora.arch.layout import ROLES, Layout
from crosslora.core import Inputs, ModuleResult, ModuleTask, source_updates
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
    Prepared,
    register,
)
from crosslora.methods.matched import calibrate as cal
from crosslora.methods.matched import entry
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
from crosslora.methods.matched.params import MatchedParams
from crosslora.methods.matched.probe import (
    INPUT_SPACE,
    Activations,
    ProbeBatch,
    activation_bytes,
    align,
    collect,
    special_id,
)
from crosslora.methods.matched.sampling import probe_texts, samples_whole
from crosslora.methods.matched.sizes import RUNTIME_BYTES, fit_bytes, kept_fit_bytes, shares
from crosslora.methods.matched.stream import Streamed, runner
from crosslora.pair_cache import PairCache
from crosslora.speed import Work

log = logging.getLogger("crosslora")

POST_NORM = {"o": "post_attn_norm", "down": "post_mlp_norm"}  # family fields (Gemma 2/3)
SAMPLED_PER_KEPT = 1.3  # probe texts sampled per text kept, on average (the plan's time estimate)
# a float64 SVD of an n x n matrix, in n³ operations at the rate a 1024 x 1024 Cholesky runs
# (``speed.factorisation_flops``): n = 4096 took 24.1 s on one thread of this project's 2-core
# CPU, whose 1024 Cholesky ran at 26.3 GFLOP/s (larger Cholesky factors run faster, 60-73 GFLOP/s
# at 11008 and 14336, so the estimate counts those about 2.5 times too slow)
SVD_CUBES = 9


@dataclass
class MatchedPair(Prepared):
    """One run's probe of the two models: the activations at the aligned positions (freed once
    the maps are done), what the calibration reads, and the fits of the current layer."""

    acts_s: Activations | None = None
    acts_t: Activations | None = None
    layouts: tuple[Layout, Layout] | None = None
    pads: tuple[int, int] = (0, 0)
    batches: tuple[ProbeBatch, ProbeBatch] | None = None
    device: torch.device = torch.device("cpu")
    runners: tuple[Streamed, Streamed] | None = None  # the calibration's, kept for the next adapter
    base_ll: tuple[torch.Tensor, torch.Tensor] | None = None  # the bases' chunk log-likelihoods
    fits: dict[tuple, tuple[int | None, int, object]] = field(default_factory=dict)
    rows_per_text: list[int] = field(default_factory=list)  # aligned positions of each text
    cache: PairCache | None = None  # where the fits are kept, beside the probe's entry
    fits_key: dict | None = None  # what every fit's entry key extends (``entry.fit_key``)
    fits_counted: dict[str, int] = field(default_factory=lambda: {"read": 0, "made": 0})


@register
class Matched(Method):
    name = "matched"
    recovered = 0.272  # docs/results.md, the six pairs "as the default runs now"
    params_type = MatchedParams
    default_layer_map = "merge"
    then = "calibrate each role's update by its effect on the probe text's likelihood"
    draws = True
    params: MatchedParams

    def for_draw(self, draw: int) -> Matched:
        p = self.params
        return Matched(replace(p, seed=p.seed + p.draw_stride * draw)) if draw else self

    def memory(self, src: Layout, tgt: Layout, device: torch.device) -> MemoryNeed:
        """The largest of the phases, each holding one model's share at a time
        (docs/methods.md, "Memory"): sampling the probe text with one model as stored
        (bfloat16 for most) and its key/value cache, whole where it fits in what is free, else
        one layer at a time (``sampling.sampler``); reading it one decoder layer at a time in
        float32 (the model without its layers, one layer, every text's hidden states); the fits,
        one layer's activations at the aligned positions (float32 and float64) and the fits held
        while the widest is factorised (``sizes.fit_bytes``); the calibration, both models
        without their layers, one layer, the hidden states of up to 9 variants of the
        calibration texts, and 4 texts' logits. The activations wait
        on disk beside the output. On a GPU all of it is there, and the host holds what loads
        (a model as stored, or a layer) or a layer's activations."""
        p = self.params
        tokens = 2 * p.text_tokens  # a probe text's tokens, at most, on either side
        sides = [shares(x, p) for x in (src, tgt)]
        whole = [samples_whole(s, device) for s in sides]
        generate = max(s["sampling_whole" if w else "sampling_by_layer"]
                       for s, w in zip(sides, whole))  # fmt: skip
        read = max(s["outside"] + 2 * s["layer"] + p.n_texts * tokens * s["width"] * 8
                   for s in sides)  # fmt: skip
        logits = 2 * 4 * (4 * tokens) * max(src.dims.vocab, tgt.dims.vocab)
        calibrate = sum(s["outside"] for s in sides) + max(
            2 * s["layer"] + 9 * p.calibration_texts * tokens * s["width"] * 4 for s in sides
        ) + logits  # fmt: skip
        positions = p.n_texts * p.text_tokens
        a_s, a_t = activation_bytes(src, positions), activation_bytes(tgt, positions)
        fits = 3 * (max(a_s) + max(a_t)) + fit_bytes(src, tgt)
        phases = {"sampling": generate, "reading": read, "fits": fits, "calibration": calibrate}
        largest = max(phases, key=phases.__getitem__)
        how = "whole" if all(whole) else "one layer at a time" if not any(whole) else "mixed"
        what = (f"the largest phase, {largest}: " + ", ".join(
            f"{k} {gb(v)}" for k, v in phases.items()) + f" (sampling {how}); the activations at "
            f"{positions} probe positions, {gb(sum(a_s) + sum(a_t))}, wait on disk")  # fmt: skip
        disk = sum(a_s) + sum(a_t)
        if device.type == "cpu":  # where the pair cache keeps the fits (``_stored``)
            what += f", and the pair cache keeps the fits, {gb(kept_fit_bytes(src, tgt))}"
            return MemoryNeed(phases[largest] + RUNTIME_BYTES, 0, what, disk)
        loads = max(s["stored"] if w else s["outside"] + s["layer"] for s, w in zip(sides, whole))
        host = max(loads, 3 * (max(a_s) + max(a_t)))
        return MemoryNeed(host + RUNTIME_BYTES, phases[largest], what, disk)

    def flops(self, src: Layout, tgt: Layout, tasks: list[ModuleTask],
              truncation_rank: int | None) -> Work:  # fmt: skip
        """Sampling the probe text, reading it (both models), the fits (each made once: its Gram
        matrix, and its float64 Cholesky factor or, for a residual-stream map, its SVD) and the
        calibration's passes (the source twice, the target 4 + 7 roles times, over the
        calibration texts)."""
        p = self.params
        w_s, w_t = parameter_bytes(src.checkpoint, 1), parameter_bytes(tgt.checkpoint, 1)
        tokens = p.n_texts * p.text_tokens
        sample = 2 * (w_s + w_t) * tokens / 2 * SAMPLED_PER_KEPT
        read = 2 * (w_s + w_t) * tokens
        calibrate = 2 * (2 * w_s + 11 * w_t) * p.calibration_texts * p.text_tokens
        fits = distinct_fits(src, tgt, tasks)
        grams = sum(2 * tokens * m * n for m, n in fits)
        factors = sum(n**3 / 3 if m == n else SVD_CUBES * min(m, n) ** 2 * max(m, n)
                      for m, n in fits)  # fmt: skip
        return Work(sample + read + calibrate + grams, factors)

    def prepare(
        self, src: Layout, tgt: Layout, device: torch.device, spool: Spool | None = None,
        cache: PairCache | None = None,
    ) -> MatchedPair:  # fmt: skip
        """The probe text, its activations and the bases' log-likelihoods of the calibration
        texts: read from ``cache`` when it holds this pair's, else made (and kept there)."""
        p = self.params
        tok_s = require_tokenizer(src.checkpoint.path, "source model")
        tok_t = require_tokenizer(tgt.checkpoint.path, "target model")
        pads = (special_id(tok_s, "pad", "eos", "bos") or 0,
                special_id(tok_t, "pad", "eos", "bos") or 0)  # fmt: skip
        probe = {k: getattr(p, k) for k in ("n_texts", "calibration_texts", "text_tokens", "seed")}
        key = entry.pair_key(src, tgt, probe, device)
        found = cache.find(key) if cache is not None else None
        made = found is None
        if found is None:
            texts = probe_texts(src, tok_s, tgt, tok_t, device, p,
                                bars=log.isEnabledFor(logging.INFO))  # fmt: skip
            batches = self._aligned(texts, tok_s, tok_t)
            if cache is None:
                acts, base_ll = self._read_probe(src, tgt, batches, pads, device, spool)
            else:
                with cache.writing(key) as folder:
                    with Spool.at(folder / entry.ACTIVATIONS, write=True) as into:
                        acts, base_ll = self._read_probe(src, tgt, batches, pads, device, into)
                    entry.write(folder, texts, acts, base_ll)
                found = cache.find(key, count=False)
        if found is not None:  # read back (a second run reads only this)
            kept = entry.read(found)
            texts, acts, base_ll = kept.texts, kept.acts, kept.base_ll
            batches = self._aligned(texts, tok_s, tok_t)
        batch_s, batch_t = batches
        diagnostics = {"probe_seed": p.seed, "probe_texts": len(texts),
                       "probe_positions": sum(len(pos) for pos in batch_s.positions),
                       "probe_tokens_source": sum(len(i) for i in batch_s.ids),
                       "probe_tokens_target": sum(len(i) for i in batch_t.ids),
                       "pair_prepared": "here" if made else "read from the pair cache"}  # fmt: skip
        pair = MatchedPair(diagnostics, *acts, (src, tgt), pads, self._calibration(batches),
                           device)  # fmt: skip
        pair.base_ll = base_ll
        pair.rows_per_text = [len(pos) for pos in batch_s.positions]
        pair.cache = cache
        if cache is not None and device.type == "cpu":  # a GPU makes them faster than a disk
            need, free = kept_fit_bytes(src, tgt), shutil.disk_usage(cache.root).free
            if need + RUNTIME_BYTES < free:
                pair.fits_key = entry.fits_key(key, p.alpha)
            else:
                log.warning("warning: the pair cache keeps no fits: they need %s and %s has %s "
                            "free", gb(need), cache.root, gb(free))  # fmt: skip
        return pair

    def _aligned(self, texts: list[str], tok_s, tok_t) -> tuple[ProbeBatch, ProbeBatch]:
        batch_s, batch_t = align(texts, tok_s, tok_t)
        n = sum(len(pos) for pos in batch_s.positions)
        if n < self.params.min_positions:
            raise CrossLoraError(
                f"only {n} positions of the probe text align between the two tokenizers "
                f"(need {self.params.min_positions}); the matched method cannot fit its maps"
            )
        return batch_s, batch_t

    def _calibration(self, batches) -> tuple[ProbeBatch, ProbeBatch]:
        """The calibration's texts: every k-th, half from each model."""
        keep = slice(None, None, self.params.n_texts // self.params.calibration_texts)
        return tuple(ProbeBatch(b.ids[keep], b.positions[keep]) for b in batches)  # type: ignore

    def _read_probe(self, src: Layout, tgt: Layout, batches, pads, device: torch.device,
                    spool: Spool | None):  # fmt: skip
        """Both models over the probe text, one layer at a time: the activations at the aligned
        positions (parked in ``spool``), and the bases' log-likelihoods of the calibration
        texts."""
        acts, base_ll = [], []
        for layout, batch, cal_batch, pad, what in zip(
            (src, tgt), batches, self._calibration(batches), pads, ("source", "target")
        ):
            run = runner(layout, device, f"{what} model")
            acts.append(collect(run, layout, batch, pad, spool=spool))
            (ll,) = cal.chunk_logliks(run, cal_batch, pad, [[]])
            base_ll.append(ll)
            del run
        return tuple(acts), tuple(base_ll)

    def calibrate(
        self, inputs: Inputs, results: list[ModuleResult], pair: MatchedPair
    ) -> Calibration:
        """Scale each role's transferred update so that, together, they change the target's
        log-likelihood of the probe text as the source adapter changes the source's
        (``calibrate``). Returns the scales and the measured agreement."""
        from tqdm.auto import tqdm

        pair.acts_s = pair.acts_t = None  # the maps are done: free the activations
        pair.fits = {}
        assert pair.layouts and pair.batches
        if pair.runners is None:
            pair.runners = (runner(pair.layouts[0], pair.device, "source model"),
                            runner(pair.layouts[1], pair.device, "target model"))  # fmt: skip
        run_s, run_t = pair.runners
        (batch_s, batch_t), (pad_s, pad_t) = pair.batches, pair.pads
        done = [r for r in results if r.skipped is None]
        roles = sorted({r.task.tgt.role for r in done}, key=ROLES.index)
        # one sweep of the source's layers, and three of the target's: its variants, its least
        # squares, its last
        bar = tqdm(total=run_s.n + 3 * run_t.n, desc="calibrate (matched)", unit="layer",
                   disable=not log.isEnabledFor(logging.INFO))  # fmt: skip

        def ll(run, batch, pad, *variants):
            return cal.chunk_logliks(run, batch, pad, variants, bar=bar)

        with bar:
            role_of = [r.task.tgt.role for r in done]
            updates = [_target_update(r) for r in done]
            without = [[u for u, ro in zip(updates, role_of) if ro != role] for role in roles]
            assert pair.base_ll is not None
            base_s, base_t = pair.base_ll
            (d_s,) = ll(run_s, batch_s, pad_s, source_updates(inputs, [r.task for r in results]))
            full, *rest = ll(run_t, batch_t, pad_t, updates, *without)
            d_s, full = d_s - base_s, full - base_t
            # each role's part: the effect lost when it alone is left out
            slopes = torch.stack([full - (r - base_t) for r in rest])
            scales = cal.fit_scales(d_s, full, slopes)
            stages = [[float(scales[roles.index(ro)])] for ro in role_of]
            _rescale(updates, [c for (c,) in stages])
            (after,) = ll(run_t, batch_t, pad_t, updates)
            after = after - base_t
            least_squares = cal.agreement(d_s, after)
            size = cal.disattenuation(least_squares["corr"])
            if size != 1.0:  # else the least-squares effect is the final one
                _rescale(updates, [size] * len(done))
                for stage in stages:
                    stage.append(size)
                (after,) = ll(run_t, batch_t, pad_t, updates)
                after = after - base_t
            else:
                bar.update(run_t.n)
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
            "pair_fits": dict(pair.fits_counted),  # read from the pair cache, or made here
        })  # fmt: skip

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, pair: MatchedPair) -> MethodOutput:
        assert ctx.src
        src, tgt, ridge_t, out_map = self._fits(ctx, pair)
        A = lora.A.to(pair.device)
        feats = src.x.double() @ A.double().mT  # (N, r): what the adapter reads on the source
        a_t = ridge_t.solve(tgt.x.double().mT @ feats).mT  # (r, n_t)
        in_fit = rel(tgt.x.double() @ a_t.mT, feats)
        if ctx.src.role in ("o", "down"):  # B_t = M B_s, M the map between write coordinates
            m, fit = out_map
            b_t = m @ lora.B.to(pair.device).double()
            return output(a_t, b_t, lora, src, tgt, in_fit, fit)
        ridge, y_s, y_t = out_map
        b_t = map_output(y_s, y_t, ridge, lora.B.to(pair.device))
        return output(a_t, b_t, lora, src, tgt, in_fit, out_fit(y_s, y_t, ridge))

    def prepare_module(self, ctx: ModuleContext, pair: MatchedPair) -> None:
        """This module's fits, made and kept in the pair cache (where it keeps fits)."""
        if pair.fits_key is not None:
            self._fits(ctx, pair)

    def _fits(self, ctx: ModuleContext, pair: MatchedPair):
        """What a module's transfer needs besides the adapter: the base modules' outputs on the
        probe (``Probe``, (N, m)), the input-space ridge on the target, and the output side's map:
        for o and down the Procrustes map between the residual streams' write coordinates and its
        residual; else the ridge and the two output spaces it maps between (q, k, v: the modules'
        outputs; gate, up: the neuron space, its activations span all of it)."""
        assert ctx.src and ctx.tgt and pair.acts_s and pair.acts_t
        role, ls, lt = ctx.src.role, ctx.src.layer, ctx.tgt.layer
        space, dev, alpha = INPUT_SPACE[role], pair.device, self.params.alpha
        x_s = pair.acts_s.inputs[(ls, space)].to(dev)
        x_t = pair.acts_t.inputs[(lt, space)].to(dev)
        src = Probe(x_s, x_s @ ctx.src_weight().to(dev).mT)
        tgt = Probe(x_t, x_t @ ctx.tgt_weight().to(dev).mT)
        if role == "down":  # gate and up, before it, were the MLP-neuron ridge's last users
            for k in [k for k in pair.fits if k[0] == "mid"]:
                del pair.fits[k]
        ridge_t = _fit(pair, ("in", lt, space), lambda: Ridge(x_t, alpha), None, lt)
        if role in ("o", "down"):
            return src, tgt, ridge_t, self._residual_map(ctx, pair, src, tgt)
        if role in ("gate", "up"):
            y_s = pair.acts_s.inputs[(ls, "mlp_mid")].to(dev)
            y_t = pair.acts_t.inputs[(lt, "mlp_mid")].to(dev)
            ridge = _fit(pair, ("mid", ls, lt), lambda: Ridge(y_s, alpha), ls, lt)
        else:  # one per module, not held: the next module reads other outputs
            y_s, y_t = src.y, tgt.y
            ridge = _stored(pair, ("out", ls, role), lambda: Ridge(y_s, alpha))
        return src, tgt, ridge_t, (ridge, y_s, y_t)

    def _residual_map(self, ctx: ModuleContext, pair: MatchedPair, src: Probe, tgt: Probe):
        """o and down: the Procrustes map ``M`` between the two sides' write coordinates and its
        residual (docs/methods.md)."""
        assert ctx.src and ctx.tgt and ctx.src_layout and ctx.tgt_layout
        ls, lt, role = ctx.src.layer, ctx.tgt.layer, ctx.src.role
        g_s = ctx.src_layout.norm_gain(POST_NORM[role], ls)
        g_t = ctx.tgt_layout.norm_gain(POST_NORM[role], lt)
        post_norm = g_s is not None or g_t is not None  # without, o and down share the map
        return _fit(pair, ("res", ls, lt, role if post_norm else None), lambda: procrustes(
            _write_coords(pair, pair.acts_s, ctx.src_layout, ls, g_s, src),
            _write_coords(pair, pair.acts_t, ctx.tgt_layout, lt, g_t, tgt),
        ), ls, lt)  # fmt: skip


def distinct_fits(src: Layout, tgt: Layout, tasks: list[ModuleTask]) -> list[tuple[int, int]]:
    """The fits a transfer of ``tasks`` makes, each once (``Matched._fits``): a ridge of width n
    as ``(n, n)``, a residual-stream map between widths m_t and m_s as ``(m_t, m_s)``."""
    seen: dict[tuple, tuple[int, int]] = {}
    for t in tasks:
        role, ls, lt = t.src.role, t.src.layer, t.tgt.layer
        n_t = t.tgt.shape[1]
        seen[("in", lt, INPUT_SPACE[role])] = (n_t, n_t)
        if role in ("o", "down"):
            post = any(x.norm_key(POST_NORM[role], i) for x, i in ((src, ls), (tgt, lt)))
            seen[("res", ls, lt, role if post else None)] = (tgt.dims.hidden, src.dims.hidden)
        elif role in ("gate", "up"):
            seen[("mid", ls, lt)] = (t.src.shape[0], t.src.shape[0])
        else:
            seen[("out", ls, role)] = (t.src.shape[0], t.src.shape[0])
    return list(seen.values())


def _fit(pair: MatchedPair, key: tuple, make, ls: int | None, lt: int):
    """A fit shared by the modules (and adapters) that use the same activations: of target layer
    ``lt``, and of source layer ``ls`` unless None. Modules come in layer order, so a fit of
    another layer is not needed again: it is dropped, and one layer's fits at most are held
    (``Matched.memory``). A fit of the source layer stays while a target-only one is asked for
    (gate and up share the MLP-neuron ridge, o and down the residual map)."""
    for k in [k for k, (l_s, l_t, _) in pair.fits.items()
              if l_t != lt or (ls is not None and l_s is not None and l_s != ls)]:  # fmt: skip
        del pair.fits[k]
    if key not in pair.fits:
        pair.fits[key] = (ls, lt, _stored(pair, key, make))
    return pair.fits[key][2]


def _stored(pair: MatchedPair, what: tuple, make):
    """``make()`` (a ``Ridge``, or a map and its residual), read from the pair cache where an
    earlier adapter for this pair made it (its probe's entry has the same key), else made and
    kept there: a later adapter pays only for its own solves."""
    if pair.fits_key is None:  # no cache, a GPU, or no disk for them
        return make()
    assert pair.cache is not None
    key = entry.fit_key(pair.fits_key, what)
    found = pair.cache.find(key, count=False)
    if found is not None:
        tensor, fit = entry.read_fit(found)
        pair.fits_counted["read"] += 1
        tensor = tensor.to(pair.device)
        return Ridge.from_factor(tensor) if fit is None else (tensor, fit)
    made = make()
    try:
        with pair.cache.writing(key, count=False) as folder:
            if isinstance(made, Ridge):
                entry.write_fit(folder, made.chol, None)
            else:
                entry.write_fit(folder, *made)
    except (OSError, CrossLoraError) as err:  # a full disk: the transfer goes on without it
        log.warning("warning: the pair cache keeps no more fits (%s)", err)
        pair.fits_key = None
    pair.fits_counted["made"] += 1
    return made


def _write_coords(pair: MatchedPair, acts: Activations, layout: Layout, layer: int, g,
                  p: Probe) -> torch.Tensor:  # fmt: skip
    """The residual stream after ``layer`` (N, d) in the coordinates its writer (output ``p.y``)
    writes: ``S⁻¹ h``, ``S = diag(g) / rms(y)``, behind a post-norm of gain ``g``; else ``h``.
    After the last layer: its own input."""
    h = acts.residual[min(layer + 1, layout.num_layers - 1)].to(pair.device)
    if g is None:
        return h
    return h.double() * (safe_inverse(g).to(pair.device).double() * median_rms(p.y))


def _rescale(updates: list[cal.Update], factors: list[float]) -> None:
    """Multiply each update's ``B`` by its factor, in place (the results' factors are the
    executor's to change)."""
    for u, c in zip(updates, factors):
        u.B = u.B * c


def _target_update(res) -> cal.Update:
    tgt, f = res.task.tgt, res.factors
    return cal.Update(tgt.slot.module, tgt.slot.rows[tgt.role], f.A, f.B, f.scale)
