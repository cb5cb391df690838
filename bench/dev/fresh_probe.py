"""Shared by the `bench/dev` diagnostics that need probe text of their own (not a test).

``fresh_probe`` samples probe text as `matched` does (half from each model) but with another seed,
aligns it and keeps both models' activations, optionally only those of some input spaces (the
residual streams are always kept)."""

from __future__ import annotations

from collections.abc import Collection

import torch

import crosslora.methods.matched as mm
from crosslora.anchor import probe
from crosslora.anchor.vocab import load_tokenizer
from crosslora.arch.layout import Layout
from crosslora.io.checkpoint import Checkpoint
from crosslora.zoo.models import model_path


def layouts(src_name: str, tgt_name: str) -> tuple[Layout, Layout]:
    """The two pulled models' layouts (names as in `crosslora models pull`)."""

    def layout(name: str, what: str) -> Layout:
        return Layout(Checkpoint(str(model_path(name, must_exist=True)), what), what)

    return layout(src_name, "source model"), layout(tgt_name, "target model")


def fresh_probe(src: Layout, tgt: Layout, n_texts: int, spaces: Collection[str]):
    """``(texts, text_of, acts_s, acts_t)``: ``n_texts`` probe texts (seed ``SEED + 7``), the text
    each aligned position comes from (N,), and both models' activations there, with the inputs of
    the given ``spaces`` only (empty: the residual streams alone, to save memory)."""
    torch.set_grad_enabled(False)
    cpu = torch.device("cpu")
    tok_s = load_tokenizer(src.checkpoint.path, "source model")
    tok_t = load_tokenizer(tgt.checkpoint.path, "target model")
    model_s = probe.load_model(src.checkpoint.path, cpu, "source model")
    model_t = probe.load_model(tgt.checkpoint.path, cpu, "target model")
    texts = mm.probe_texts(model_s, tok_s, model_t, tok_t, n_texts, mm.SEED + 7)
    batch_s, batch_t = probe.align(texts, tok_s, tok_t)
    every = probe._input_modules
    probe._input_modules = lambda lay: {m: k for m, k in every(lay).items() if k[1] in spaces}
    sides = ((model_s, src, batch_s, tok_s), (model_t, tgt, batch_t, tok_t))
    try:
        acts_s, acts_t = (probe.collect(model, layout, batch,
                                        probe.special_id(tok, "pad", "eos", "bos") or 0)
                          for model, layout, batch, tok in sides)  # fmt: skip
    finally:
        probe._input_modules = every
    text_of = torch.tensor([j for j, p in enumerate(batch_s.positions) for _ in p])
    return texts, text_of, acts_s, acts_t
