"""The teacher: the source model with its adapter writes text, and scores every token of it with
and without the adapter (TiTok's *contrastive excess*), so the refine trains where the adapter
acts.

Data-free, each text starts from the model's document start (its BOS token, else its EOS, the
separator GPT-2-style models learned documents begin after) and is whatever the adapted model
writes: nothing task-specific goes in. With prompts (Trans-LoRA, TiTok), the teacher is shown
``shots`` of them and writes a new task input, kept when its ROUGE-L to every kept input is below
``max_rouge``; every input, given or written, is then answered by the teacher.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from crosslora.errors import CrossLoraError
from crosslora.hooks import Update, applied
from crosslora.padding import right_padded
from crosslora.refine.params import RefineParams
from crosslora.refine.prompts import novel
from crosslora.refine.spans import Tokens, tokens

SEPARATOR = "\n\n"  # between the seed inputs shown to the teacher, and where a new one ends
BATCH = 16


@dataclass
class Text:
    """A teacher text: ``context`` (a task input, or empty) and the ``response`` the teacher
    wrote after it. Only the response's tokens can be selected."""

    context: str
    response: str

    @property
    def text(self) -> str:
        return self.context + self.response


@dataclass
class Scored:
    """A text tokenized for the source, with each token's excess ``log p(source + adapter) −
    log p(source)`` (T,) (NaN where the token is not the teacher's: the context, the first
    token, special tokens) and, per position ``i``, the teacher's ``top_k`` most likely next
    tokens among the shared vocabulary (as target ids), their renormalised probabilities and how
    far the adapter moves each (log-probabilities over the shared vocabulary)."""

    text: Text
    src: Tokens
    excess: torch.Tensor
    top_ids: torch.Tensor  # (T, k) target ids
    top_p: torch.Tensor  # (T, k)
    top_shift: torch.Tensor  # (T, k): log p(source + adapter) − log p(source) of those tokens

    def mean_excess(self) -> float:
        live = ~self.excess.isnan()
        return float(self.excess[live].mean()) if live.any() else float("-inf")


def start_ids(tokenizer) -> list[int]:
    """What the model reads before any text: its own special tokens, else BOS or EOS."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids:
        return ids
    for name in ("bos", "eos"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            return [int(tid)]
    raise CrossLoraError("the source tokenizer has no BOS or EOS token to start writing from")


@torch.no_grad()
def continue_texts(model, tokenizer, contexts: list[str], new_tokens: int, params: RefineParams,
                   seed: int, bar=None) -> list[str]:  # fmt: skip
    """What ``model`` writes after each context (``new_tokens`` at most, stopping at its EOS):
    sampled with ``temperature`` and ``top_p``, the random state fixed by ``seed`` per batch."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    out: list[str] = []
    for lo in range(0, len(contexts), BATCH):
        rows = [start_ids(tokenizer) + tokenizer(c, add_special_tokens=False)["input_ids"]
                if c else start_ids(tokenizer) for c in contexts[lo : lo + BATCH]]  # fmt: skip
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):  # left-padded: every row's next token is at the end
            ids[j, width - len(r) :] = torch.tensor(r)
            mask[j, width - len(r) :] = 1
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + lo)
            made = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                temperature=params.temperature, top_p=params.top_p, top_k=0,
                max_new_tokens=new_tokens, pad_token_id=pad,
            )  # fmt: skip
        out += tokenizer.batch_decode(made[:, width:], skip_special_tokens=True)
        if bar is not None:
            bar.update(len(rows))
    return out


def write(model, tokenizer, updates: list[Update], params: RefineParams, bar=None) -> list[Text]:
    """The teacher's texts: ``params.generated`` of them (fewer if, with prompts, it stops
    writing new task inputs); ``model`` with ``updates`` applied writes them."""
    n = params.generated
    with applied(model, updates):
        if not params.prompts:
            responses = continue_texts(model, tokenizer, [""] * n, params.text_tokens, params,
                                       params.seed, bar)  # fmt: skip
            return [Text("", r) for r in responses if r.strip()]
        if bar is not None:
            bar.total = 2 * n - min(len(set(params.prompts)), n)  # inputs to write, then answers
        inputs = _task_inputs(model, tokenizer, params, bar)
        responses = continue_texts(model, tokenizer, inputs, params.text_tokens, params,
                                   params.seed + 1, bar)  # fmt: skip
    return [Text(c, r) for c, r in zip(inputs, responses) if r.strip()]


def _task_inputs(model, tokenizer, params: RefineParams, bar=None) -> list[str]:
    """The given prompts, then new ones the teacher writes after ``shots`` of them, each kept
    only when novel (ROUGE-L below ``max_rouge`` to every kept input), until ``generated``."""
    rng = random.Random(params.seed)
    kept = list(dict.fromkeys(params.prompts))[: params.generated]
    tries, limit = 0, 4 * params.generated
    while len(kept) < params.generated and tries < limit:
        want = min(BATCH, limit - tries)
        shown = [SEPARATOR.join(rng.sample(params.prompts, min(params.shots, len(params.prompts))))
                 + SEPARATOR for _ in range(want)]  # fmt: skip
        for made in continue_texts(model, tokenizer, shown, params.text_tokens, params,
                                   params.seed + 7 * tries + 2):  # fmt: skip
            new = made.split(SEPARATOR)[0].strip()
            if len(new.split()) >= 3 and novel(new, kept, params.max_rouge):
                kept.append(new)
                if bar is not None and len(kept) <= params.generated:
                    bar.update(1)
        tries += want
    return kept[: params.generated]


@torch.no_grad()
def score(model, tokenizer, texts: list[Text], updates: list[Update],
          shared: tuple[torch.Tensor, torch.Tensor] | None, k: int,
          bar=None) -> list[Scored]:  # fmt: skip
    """Each text's tokens scored by the source with and without ``updates``; with ``shared``
    (source ids, target ids of the shared vocabulary), also the teacher's top ``k`` there (else
    nothing, k = 0: the ``nll`` objective reads no distribution)."""
    device = next(model.parameters()).device
    src_ids, tgt_ids = (t.to(device) for t in shared) if shared else (None, None)
    out: list[Scored] = []
    for lo in range(0, len(texts), BATCH):
        chunk = texts[lo : lo + BATCH]
        toks = [tokens(tokenizer, t.text) for t in chunk]
        ids, mask = (t.to(device) for t in right_padded([t.ids for t in toks], 0))
        logits = model(input_ids=ids, attention_mask=mask).logits
        base = _token_logprobs(logits, ids)
        base_shared = None if src_ids is None else _over(logits, src_ids)
        with applied(model, updates):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        with_adapter = _token_logprobs(logits, ids)
        if src_ids is None:
            top = [torch.zeros(*ids.shape, 0, dtype=d) for d in (torch.long, torch.float32,
                                                                 torch.float32)]  # fmt: skip
        else:
            top = _top(_over(logits, src_ids), base_shared, tgt_ids, k)
        del logits, base_shared
        for j, (t, text) in enumerate(zip(toks, chunk)):
            n = len(t.ids)
            excess = (with_adapter[j, :n] - base[j, :n]).cpu()
            for i, (start, end) in enumerate(t.spans):
                if i == 0 or end <= start or start < len(text.context):
                    excess[i] = math.nan
            out.append(Scored(text, t, excess, *(x[j, :n].cpu() for x in top)))
        if bar is not None:
            bar.update(len(chunk))
    return out


def _over(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, T, V) renormalised over the vocabulary ``ids`` (V,)."""
    return torch.log_softmax(logits[..., ids].float(), dim=-1)


def _top(adapted: torch.Tensor, base: torch.Tensor, tgt_ids: torch.Tensor, k: int) -> list:
    """From the shared vocabulary's log-probabilities with and without the adapter (B, T, V):
    the adapted teacher's top ``k`` as target ids, their probabilities renormalised over them,
    and the adapter's shift of each, each (B, T, k)."""
    top = adapted.topk(min(k, adapted.shape[-1]), dim=-1)
    p = top.values.exp()
    shift = top.values - base.gather(-1, top.indices)
    return [tgt_ids[top.indices], p / p.sum(-1, keepdim=True), shift]


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: ``log p(ids[:, i] | ids[:, :i])`` at i ≥ 1, 0 at i = 0 (no copy of the
    logits: a 262k vocabulary makes them the largest tensor by far)."""
    head = logits[:, :-1]
    lp = head.gather(-1, ids[:, 1:, None])[..., 0].float() - head.float().logsumexp(-1)
    return torch.cat([lp.new_zeros(len(ids), 1), lp], dim=1)
