"""Where the adapter acts: the teacher texts and tokens the student trains on.

Texts are ranked by their tokens' mean excess and the top ``texts`` kept; in each, the
``token_keep`` fraction of its tokens with the largest excess is selected (TiTok's two
selections). The selection reaches the target's tokens through character spans
(``spans.carry``); the ``kl`` objective reads the teacher's distribution at the aligned
positions whose next source token is selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crosslora.refine.params import RefineParams
from crosslora.refine.spans import aligned, carry, tokens
from crosslora.refine.teacher import Scored


@dataclass
class Example:
    """One teacher text for the student: its target token ids, whether each is a selected token
    (``nll``: a loss on predicting it), and the teacher's distributions ``kl_ids``/``kl_p``
    (P, k) for the next token at target positions ``kl_pos`` (P,), with the adapter's shift of
    their log-probabilities ``kl_shift`` (P, k) (``shift``; ``kl_base`` the student's base
    log-probabilities of them, filled in before training)."""

    ids: list[int]
    nll: list[bool]
    kl_pos: list[int]
    kl_ids: torch.Tensor
    kl_p: torch.Tensor
    kl_shift: torch.Tensor
    kl_base: torch.Tensor | None = None


def select(scored: list[Scored], tok_t, params: RefineParams) -> tuple[list[Example], dict]:
    """The kept texts as student examples, and counts for the report."""
    ranked = sorted(scored, key=lambda s: -s.mean_excess())
    kept = [s for s in ranked if math.isfinite(s.mean_excess())][: params.texts]
    examples, src_kept, tgt_kept = [], 0, 0
    for s in kept:
        live = (~s.excess.isnan()).nonzero()[:, 0]
        n = max(1, math.ceil(params.token_keep * len(live)))
        chosen = live[s.excess[live].topk(min(n, len(live))).indices]
        selected = [False] * len(s.src.ids)
        for i in chosen.tolist():
            selected[i] = True
        tgt = tokens(tok_t, s.text.text)
        if len(tgt.ids) < 2:
            continue
        nll = carry(s.src, selected, tgt)
        nll[0] = False  # nothing predicts the first token
        pairs = [(i, p) for i, p in aligned(s.src, tgt) if selected[i + 1]]
        idx = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        examples.append(Example(tgt.ids, nll, [p for _, p in pairs], s.top_ids[idx],
                                s.top_p[idx], s.top_shift[idx]))  # fmt: skip
        src_kept += len(chosen)
        tgt_kept += sum(nll)
    means = [s.mean_excess() for s in kept]
    counts = {"texts_written": len(scored), "texts_kept": len(kept),
              "source_tokens_kept": src_kept, "target_tokens_kept": tgt_kept,
              "kl_positions": sum(len(e.kl_pos) for e in examples),
              "mean_excess_kept": round(sum(means) / len(means), 4) if means else None}  # fmt: skip
    return examples, counts
