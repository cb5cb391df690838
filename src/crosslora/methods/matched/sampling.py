"""Sampling ``matched``'s probe text: one model at a time, in its checkpoint's dtype, whole where it
fits (else one layer at a time)."""

from __future__ import annotations

import logging

import torch

from crosslora.arch.layout import Layout
from crosslora.io.pretrained import load_model
from crosslora.memory import available, gb
from crosslora.methods.matched.params import MatchedParams
from crosslora.methods.matched.probe import readable, sample_texts
from crosslora.methods.matched.sizes import RUNTIME_BYTES, shares
from crosslora.methods.matched.stream import Sampler, Streamed

log = logging.getLogger("crosslora")


def probe_texts(src: Layout, tok_s, tgt: Layout, tok_t, device: torch.device,
                p: MatchedParams, bars: bool = False) -> list[str]:  # fmt: skip
    """``p.n_texts`` probe texts: the first half sampled from the source model (``p.seed``), the
    rest from the target (``p.seed + 1``), ``p.text_tokens`` new tokens each, each one both
    models can read (``probe.readable``; fewer when a model's samples rarely are); progress bars
    when ``bars``. One model at a time, in its checkpoint's dtype (``sampler``)."""
    half = p.n_texts // 2

    def keep(text: str) -> bool:
        return readable(text, tok_s, tok_t)

    texts = []
    sides = [(src, tok_s, half, p.seed, "source"),
             (tgt, tok_t, p.n_texts - half, p.seed + 1, "target")]  # fmt: skip
    for layout, tok, n, seed, what in sides:
        model = sampler(layout, device, f"{what} model", p)
        texts += sample_texts(model, tok, n, p.text_tokens, seed, keep=keep,
                              desc=f"probe text ({what})" if bars else None)  # fmt: skip
        del model
    return texts


def samples_whole(share: dict[str, int], device: torch.device) -> bool:
    """Whether a model (``sizes.shares``) samples whole: it fits, as stored, in what ``device``
    has free now (unknown: no, the estimate is then the least the run needs)."""
    free = None
    if device.type != "cuda" or torch.cuda.is_available():
        host, dev = available(device)
        free = dev if device.type == "cuda" else host
    return free is not None and share["sampling_whole"] + RUNTIME_BYTES <= free


def sampler(layout: Layout, device: torch.device, what: str, p: MatchedParams):
    """The model that samples the probe text: whole, as stored, where it fits in what is free
    on ``device``; else one layer at a time (``stream.Sampler``: the same numbers, slower)."""
    share = shares(layout, p)
    if samples_whole(share, device):
        return load_model(layout.checkpoint.path, device, what, dtype="auto")
    log.info("%s: %s as stored does not fit in what is free; it samples one layer at a time",
             what, gb(share["stored"]))  # fmt: skip
    return Sampler(Streamed(layout, device, what, dtype=stored_dtype(layout)))


def stored_dtype(layout: Layout) -> torch.dtype:
    """The dtype of the model's floating-point weights as stored (bfloat16 for most)."""
    ckpt = layout.checkpoint
    kinds = {ckpt.dtype(k) for k in ckpt.keys()}
    for name, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        if name in kinds:
            return dtype
    return torch.float32
