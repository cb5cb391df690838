"""Batched log-likelihood of continuations, with lm-evaluation-harness's tokenisation.

Tokenisation (lm-eval ``LM._encode_pair`` / ``HFLM.tok_encode``): trailing whitespace of the
context moves to the continuation; the context and context+continuation are each encoded
whole, and the continuation's tokens are the whole encoding past the context's token count.
An empty context becomes the BOS (else EOS) token. Special tokens follow the tokenizer's own
default unless ``add_special_tokens`` says otherwise, and are not added to a string that
already starts with the prefix token's text. The model reads ``(context + continuation)[:-1]``,
left-truncated to its maximum length, and each continuation token is scored by the
log-softmax (float32) of the logits one position before it.

Two ways to run it, equal to float precision, chosen per context:

- ``flat``: one right-padded row per (context, continuation) request, sorted by length;
- ``shared``: each distinct context is run once (all its tokens but the last, right-padded
  across items), its KV cache is repeated once per choice, and the choices (the context's last
  token + the continuation's tokens but the last) run as a second, right-padded batch that
  attends to the cache through an explicit 2-D mask and position ids. It saves re-reading a
  context once per choice: four times for ARC, twice for BoolQ's long passages.

``auto`` uses ``shared`` where it is exact (a context of at least two tokens, and a whole
sequence no longer than the model's sliding window, if it has one) and saves work (the
context has two or more choices), ``flat`` elsewhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from crosslora.errors import CrossLoraError
from crosslora.eval.spec import Item

STRATEGIES = ("auto", "flat", "shared")
_DEFAULT_MAX_LENGTH = 2048
# Upper bound on the float32 logits of one forward pass; large vocabularies (Gemma: 262k)
# would otherwise dominate memory long before the batch size does.
_LOGITS_BUDGET_BYTES = 1 << 28


@dataclass(frozen=True)
class ChoiceScore:
    """One request's summed log-likelihood, its token count, and whether greedy decoding
    would have produced exactly its tokens."""

    loglik: float
    n_tokens: int
    greedy: bool


@dataclass
class _Group:
    """A distinct context of one item and the choices continuing it."""

    context: list[int]
    members: list[tuple[int, int, list[int]]]  # (item index, choice index, continuation ids)


# --- tokenisation --------------------------------------------------------------------------------


class Encoder:
    """lm-eval's request tokenisation for one tokenizer."""

    def __init__(self, tokenizer, add_special_tokens: bool | None = None, max_length: int = 2048):
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.max_length = max_length
        self.prefix_token_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if self.prefix_token_id is None:
            raise CrossLoraError("the model's tokenizer has neither a BOS nor an EOS token")
        self._prefix_text = tokenizer.decode(self.prefix_token_id)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """``HFLM.tok_encode``: an explicit ``add_special_tokens`` wins, then the encoder's
        setting, then the tokenizer's default; a text that already starts with the prefix
        token's text gets no special tokens unless the call asks for them."""
        flag = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        if add_special_tokens is None and text.startswith(self._prefix_text):
            kwargs = {"add_special_tokens": False}
        return list(self.tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), before truncation."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context left-truncated so that the model reads at most ``max_length`` tokens."""
        if not cont:
            raise ValueError("a continuation encodes to no tokens")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds {self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:] if len(ctx) > keep else ctx


def model_max_length(model, tokenizer) -> int:
    """As lm-eval resolves it: the model config's length, else the tokenizer's, else 2048."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return _DEFAULT_MAX_LENGTH


def _tail(text: str, n: int = 30) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def check_items(items: Sequence[Item], tokenizer, desc: str | None = None) -> None:
    """Tokenise every request as ``score_items`` will, without a model: a continuation that
    encodes to no tokens is one ``CrossLoraError`` naming the item and choice."""
    _groups(items, Encoder(tokenizer, None, max_length=1 << 40), desc)


def _groups(items: Sequence[Item], encoder: Encoder, desc: str | None = None) -> list[_Group]:
    """Requests grouped by (item, context tokens); each distinct context is encoded once."""
    groups: list[_Group] = []
    for i, item in enumerate(items):
        by_context: dict[tuple[int, ...], _Group] = {}
        ctx_ids: dict[str, list[int]] = {}
        for j, (context, continuation) in enumerate(
            zip(item.contexts, item.continuations, strict=True)
        ):
            stripped = context.rstrip()  # trailing whitespace moves to the continuation
            if stripped:
                if stripped not in ctx_ids:
                    ctx_ids[stripped] = encoder.encode(stripped)
                ctx = ctx_ids[stripped]
                cont = encoder.encode(context + continuation)[len(ctx) :]
            else:
                ctx, cont = encoder.encode_pair(context, continuation)
            try:
                ctx = encoder.truncate(ctx, cont)
            except ValueError as err:  # the task's data, not a bug: say which item and choice
                raise CrossLoraError(
                    f"{desc + ' ' if desc else ''}item {item.id} choice {j} "
                    f"({continuation!r} after {_tail(context)!r}): {err}"
                ) from err
            key = tuple(ctx)
            if key not in by_context:
                by_context[key] = _Group(ctx, [])
                groups.append(by_context[key])
            by_context[key].members.append((i, j, cont))
    return groups


# --- the forward passes --------------------------------------------------------------------------


def _continuation_scores(
    logprobs: torch.Tensor, targets: torch.Tensor, starts: Sequence[int], lengths: Sequence[int]
) -> list[tuple[float, bool]]:
    """Per row r: the summed log-prob of ``targets[r, starts[r] : starts[r] + lengths[r]]``,
    and whether each of those tokens is the argmax.

    ``logprobs``: (rows, positions, vocab), float32; ``targets``: (rows, positions), padded.
    """
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    greedy = (logprobs.argmax(-1) == targets).cpu()
    out = []
    for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        out.append((float(picked[r, s : s + n].sum()), bool(greedy[r, s : s + n].all())))
    return out


def _forward_flat(model, rows: list[tuple[list[int], list[int]]], device) -> list[tuple]:
    """Score (context, continuation) pairs as right-padded rows of ``(ctx + cont)[:-1]``."""
    inputs = [ctx + cont[:-1] for ctx, cont in rows]
    width = max(len(x) for x in inputs)
    # Only positions from the earliest continuation-predicting one on need logits.
    first = min(len(ctx) - 1 for ctx, _ in rows)
    starts = [len(ctx) - 1 - first for ctx, _ in rows]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width - first, dtype=torch.long)
    for r, ((_, cont), x, s) in enumerate(zip(rows, inputs, starts, strict=True)):
        ids[r, : len(x)] = torch.tensor(x)
        targets[r, s : s + len(cont)] = torch.tensor(cont)
    keep = torch.arange(first, width, device=device)
    logits = model(input_ids=ids.to(device), logits_to_keep=keep, use_cache=False).logits
    logprobs = logits.float().log_softmax(-1)
    return _continuation_scores(
        logprobs, targets.to(device), starts, [len(cont) for _, cont in rows]
    )


def _forward_shared(model, groups: list[_Group], device) -> list[tuple]:
    """Score every member of ``groups``: contexts once, then all continuations over the cache."""
    prefixes = [g.context[:-1] for g in groups]  # each at least one token
    p_width = max(len(p) for p in prefixes)
    p_ids = torch.zeros(len(groups), p_width, dtype=torch.long)
    p_mask = torch.zeros(len(groups), p_width, dtype=torch.long)
    for r, p in enumerate(prefixes):
        p_ids[r, : len(p)] = torch.tensor(p)
        p_mask[r, : len(p)] = 1
    positions = torch.arange(p_width).expand(len(groups), -1)
    cache_kwarg = _cache_kwarg(model)
    out = model(
        input_ids=p_ids.to(device),
        attention_mask=p_mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None) or out.past_key_values

    members = [(g_idx, m) for g_idx, g in enumerate(groups) for m in g.members]
    conts = [[groups[g_idx].context[-1]] + m[2][:-1] for g_idx, m in members]
    c_width = max(len(c) for c in conts)
    c_ids = torch.zeros(len(members), c_width, dtype=torch.long)
    c_pos = torch.zeros(len(members), c_width, dtype=torch.long)
    targets = torch.zeros(len(members), c_width, dtype=torch.long)
    mask = torch.zeros(len(members), p_width + c_width, dtype=torch.long)
    for r, ((g_idx, (_, _, cont)), x) in enumerate(zip(members, conts, strict=True)):
        n_prefix = len(prefixes[g_idx])
        c_ids[r, : len(x)] = torch.tensor(x)
        c_pos[r] = torch.arange(n_prefix, n_prefix + c_width)
        targets[r, : len(cont)] = torch.tensor(cont)
        mask[r, :n_prefix] = 1
        mask[r, p_width : p_width + len(x)] = 1
    cache.reorder_cache(torch.tensor([g_idx for g_idx, _ in members], device=device))
    logits = model(
        input_ids=c_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=c_pos.to(device),
        use_cache=True,
        **{cache_kwarg: cache},
    ).logits
    logprobs = logits.float().log_softmax(-1)
    lengths = [len(m[2]) for _, m in members]
    return _continuation_scores(logprobs, targets.to(device), [0] * len(members), lengths)


def _cache_kwarg(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (before), as the model takes it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --- batching ------------------------------------------------------------------------------------


def _vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _sliding_window(model) -> int | None:
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window) if window else None


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int, budget: int) -> Iterator[range]:
    """Consecutive ranges of units; a unit is (rows, logit positions per row).

    A range holds at most ``batch_size`` rows and ``budget`` rows x positions, and at least one
    unit.
    """
    start, rows, width = 0, 0, 0
    for k, (n, w) in enumerate(sizes):
        new_rows, new_width = rows + n, max(width, w)
        if k > start and (new_rows > batch_size or new_rows * new_width > budget):
            yield range(start, k)
            start, new_rows, new_width = k, n, w
        rows, width = new_rows, new_width
    if start < len(sizes):
        yield range(start, len(sizes))


@torch.inference_mode()
def score_items(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    strategy: str = "auto",
    add_special_tokens: bool | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> list[list[ChoiceScore]]:
    """``[item][choice]`` scores of every request of ``items``.

    ``batch_size`` bounds the number of continuation rows per forward pass. ``model`` is used
    as it is (``eval()`` mode is the caller's); inputs go to ``device``, by default the device
    of the model's first parameter.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    encoder = Encoder(tokenizer, add_special_tokens, model_max_length(model, tokenizer))
    groups = _groups(items, encoder, desc)
    window = _sliding_window(model)
    budget = max(1, _LOGITS_BUDGET_BYTES // (4 * _vocab_size(model)))

    def fits_shared(g: _Group) -> bool:
        longest = max(len(m[2]) for m in g.members)
        return len(g.context) >= 2 and (window is None or len(g.context) + longest <= window)

    if strategy == "flat":
        use_shared = [False] * len(groups)
    elif strategy == "shared":
        use_shared = [fits_shared(g) for g in groups]
        if not all(use_shared):
            raise ValueError("strategy 'shared' needs contexts of 2+ tokens within the window")
    else:  # a context read by one choice only (WinoGrande) gains nothing from a second pass
        use_shared = [len(g.members) > 1 and fits_shared(g) for g in groups]

    results: list[list[ChoiceScore | None]] = [[None] * it.n_choices for it in items]
    n_requests = sum(it.n_choices for it in items)
    bar = tqdm(total=n_requests, desc=desc, unit="req", disable=not progress, leave=False)

    # Longest first, as lm-eval does: a batch that does not fit fails at once.
    shared = sorted(
        (g for g, s in zip(groups, use_shared, strict=True) if s),
        key=lambda g: (-len(g.context), -max(len(m[2]) for m in g.members)),
    )
    sizes = [(len(g.members), max(len(m[2]) for m in g.members)) for g in shared]
    for rng in _batches(sizes, batch_size, budget):
        batch = [shared[k] for k in rng]
        scores = _forward_shared(model, batch, device)
        members = [m for g in batch for m in g.members]
        for (i, j, cont), (loglik, greedy) in zip(members, scores, strict=True):
            results[i][j] = ChoiceScore(loglik, len(cont), greedy)
        bar.update(len(members))

    flat = [
        (g.context, m) for g, s in zip(groups, use_shared, strict=True) if not s for m in g.members
    ]
    flat.sort(key=lambda r: -(len(r[0]) + len(r[1][2])))
    sizes = [(1, len(ctx) + len(m[2])) for ctx, m in flat]
    for rng in _batches(sizes, batch_size, budget):
        batch = [flat[k] for k in rng]
        scores = _forward_flat(model, [(ctx, m[2]) for ctx, m in batch], device)
        for (_, (i, j, cont)), (loglik, greedy) in zip(batch, scores, strict=True):
            results[i][j] = ChoiceScore(loglik, len(cont), greedy)
        bar.update(len(batch))
    bar.close()
    assert all(s is not None for row in results for s in row)
    return results  # type: ignore[return-value]


def loglikelihood(
    model, tokenizer, requests: Sequence[tuple[str, str]], **kwargs
) -> list[ChoiceScore]:
    """Plain (context, continuation) requests, as lm-eval's ``loglikelihood``."""
    items = [Item(str(k), (c,), (x,), (x,), 0) for k, (c, x) in enumerate(requests)]
    return [row[0] for row in score_items(model, tokenizer, items, **kwargs)]
