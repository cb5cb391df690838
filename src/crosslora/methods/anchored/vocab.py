"""The shared vocabulary: tokens whose text is identical in both tokenizers.

Token strings are normalised to the text they stand for before comparing: SentencePiece's ``▁``
becomes a space, GPT-2-style byte-level strings (``Ġ`` for a space, ``Ċ`` for a newline, ...)
are decoded through the byte-to-unicode table. Special and added tokens, byte-fallback tokens
(``<0x0A>``) and strings that are not valid UTF-8 are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch

BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_texts(tokenizer) -> dict[str, int]:
    """Normalised text -> token id (the smallest id when several tokens share a text)."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    byte_level = sum(t.startswith("Ġ") for t in vocab) > sum(t.startswith("▁") for t in vocab)
    table = _unicode_to_byte()
    texts: dict[str, int] = {}
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tok in special or BYTE_FALLBACK.match(tok):
            continue
        if byte_level:
            try:
                text = bytes(table[c] for c in tok).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        else:
            text = tok.replace("▁", " ")
        if text and text not in texts:
            texts[text] = idx
    return texts


@dataclass(frozen=True)
class SharedVocab:
    """Aligned id lists: ``src_ids[i]`` and ``tgt_ids[i]`` are the same text."""

    src_ids: torch.Tensor  # (n,) int64
    tgt_ids: torch.Tensor  # (n,) int64
    src_size: int  # usable tokens in each vocabulary
    tgt_size: int

    def __len__(self) -> int:
        return len(self.src_ids)


def shared_vocab(src_tokenizer, tgt_tokenizer) -> SharedVocab:
    src, tgt = token_texts(src_tokenizer), token_texts(tgt_tokenizer)
    common = sorted(set(src) & set(tgt))
    return SharedVocab(
        torch.tensor([src[t] for t in common], dtype=torch.long),
        torch.tensor([tgt[t] for t in common], dtype=torch.long),
        len(src),
        len(tgt),
    )
