"""Token selections carried between two tokenizations of one text by their character spans.

A source token marks the characters ``[start, end)`` of the text. A target token is selected when
its span overlaps a selected source token's (a walk over both sorted span lists, as TiTok
aligns them). Positions where both tokenizations end at the same character are *aligned*: there
both models predict the text that follows the same prefix, so their next-token distributions
over the shared vocabulary are comparable (the ``kl`` objective).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tokens:
    """One text tokenized with the model's own special tokens: ``ids`` and each token's
    character span ``(start, end)`` (``(0, 0)`` for special tokens)."""

    ids: list[int]
    spans: list[tuple[int, int]]


def tokens(tokenizer, text: str) -> Tokens:
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return Tokens(list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]])


def carry(src: Tokens, selected: list[bool], tgt: Tokens) -> list[bool]:
    """Per target token: does its span overlap the span of a selected source token?"""
    chosen = sorted(s for s, keep in zip(src.spans, selected) if keep and s[1] > s[0])
    out, i = [], 0
    for start, end in tgt.spans:
        if end <= start:
            out.append(False)
            continue
        while i < len(chosen) and chosen[i][1] <= start:
            i += 1  # ends before this token: no later target token (sorted) can overlap it
        out.append(i < len(chosen) and chosen[i][0] < end)
    return out


def aligned(src: Tokens, tgt: Tokens) -> list[tuple[int, int]]:
    """``(i, p)``: source token ``i`` and target token ``p`` (neither the last) end at the same
    character, so both positions predict the text that follows the same prefix."""
    ends_t = {end: p for p, (start, end) in enumerate(tgt.spans[:-1]) if end > start}
    return [(i, ends_t[end]) for i, (start, end) in enumerate(src.spans[:-1])
            if end > start and end in ends_t]  # fmt: skip
