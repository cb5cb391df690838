"""``--prompts FILE``: a few unlabeled task inputs that seed the teacher, and the diversity test
its new inputs must pass (ROUGE-L, as Trans-LoRA and TiTok filter theirs).

The file holds one input per line, or JSON lines (each a string, or an object whose ``text``,
``prompt``, ``input`` or ``question`` is one, for inputs that span lines). Blank lines are
skipped. Nothing else of the file is read: answers, if any, never reach the refine.
"""

from __future__ import annotations

import json
import os

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.files import open_regular

KEYS = ("text", "prompt", "input", "question")
MAX_BYTES = 64 << 20


def read_prompts(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The task inputs in ``path``, in order; a one-line ``CrossLoraError`` for anything else."""
    where = f"--prompts {path}"
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise CrossLoraError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise CrossLoraError(f"{where}: a folder, not a file of prompts") from None
    except OSError as err:
        raise CrossLoraError(f"{where}: cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_BYTES:
        raise CrossLoraError(f"{where}: larger than {MAX_BYTES >> 20} MB; a few prompts are enough")
    if b"\0" in raw:
        raise CrossLoraError(f"{where}: not a text file (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CrossLoraError(f"{where}: not UTF-8 text (byte {err.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise CrossLoraError(f"{where}: holds no prompts (one per line, or JSON lines)")
    parsed = [_json(line) for _, line in lines]
    if all(p is not None for p in parsed):
        prompts = [_field(p, n, where) for (n, _), p in zip(lines, parsed)]
    else:
        prompts = [line for _, line in lines]
    if any("\ufffd" in p for p in prompts):
        raise CrossLoraError(f"{where}: holds replacement characters (a mis-decoded file?)")
    return tuple(prompts)


def _json(line: str):
    if not line.startswith(("{", '"')):
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def _field(value, n: int, where: str) -> str:
    if isinstance(value, dict):
        value = next((value[k] for k in KEYS if isinstance(value.get(k), str)), None)
        if value is None:
            raise CrossLoraError(f"{where}: line {n} has none of the fields {', '.join(KEYS)}")
    if not isinstance(value, str) or not value.strip():
        raise CrossLoraError(f"{where}: line {n} is not a text prompt")
    return value.strip()


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts' lower-cased words (1: one is the other's word sequence)."""
    x, y = a.lower().split(), b.lower().split()
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for wx in x:
        cur = [0]
        for j, wy in enumerate(y):
            cur.append(prev[j] + 1 if wx == wy else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def novel(candidate: str, kept: list[str], max_rouge: float) -> bool:
    """True when ``candidate`` is below ``max_rouge`` ROUGE-L to every kept input."""
    return all(rouge_l(candidate, k) < max_rouge for k in kept)


@torch.no_grad()
def nll_per_char(model, tokenizer, texts: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Each text's NLL under ``model`` (no adapter) in nats per character (len(texts),) float64,
    read after the model's document start (its BOS, else its end-of-text token): per character,
    so that two tokenizers' readings of the same text compare (``--refine-objective auto``)."""
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        if start is not None:
            ids = torch.cat([torch.tensor([[start]]), ids], dim=1)
        ids = ids.to(device)
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        out.append(-float(logp.gather(-1, ids[0, 1:, None]).sum()) / max(len(text), 1))
    return torch.tensor(out, dtype=torch.float64)
