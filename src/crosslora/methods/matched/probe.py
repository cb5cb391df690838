"""Paired activations of the two base models on the same text, with no data: the text is what the
models generate themselves.

1. **Probe text.** Each model samples ``n_texts / 2`` continuations of its own start token
   (temperature 1, top-p 0.95 within the top 1024, a fixed seed): ordinary text in the models'
   own distribution, from no dataset. A sample is kept only if both models can read it
   (``readable``): each tokenizer spends at most ``MAX_PIECES`` tokens per aligned position (a
   script one vocabulary lacks is spelled out in byte pieces, and the states there do not describe
   the text as the other model's do), and it is not a degenerate loop (at most ``MAX_REPEATED`` of
   its character ``LOOP_CHARS``-grams repeat an earlier one). Sampling goes on, up to ``TRIES``
   times the texts asked for, until enough are kept.
2. **Aligned positions.** Both tokenizers encode every text with character offsets. A position
   where a source token and a target token end at the same character has read the same prefix of
   the text in both models, so their hidden states there describe the same thing. The first
   ``SKIP_TOKENS`` tokens of each text are left out (attention-sink positions carry outsized
   activations in many models and say little about the rest).
3. **Activations.** One forward pass per model over all texts, one decoder layer at a time
   (``stream``); forward pre-hooks keep, at the aligned positions only, the input of every
   adapted module (one copy per input space: the attention input q/k/v read, the MLP input
   gate/up read, the attention output o reads, the MLP intermediate down reads) and the
   residual stream entering each layer.

Shapes: ``inputs[(layer, space)]`` is (N, n_in) and ``residual[layer]`` is (N, d) in float32, N the
number of aligned positions, the same rows in the same order for both models.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from crosslora.arch.layout import Layout
from crosslora.errors import CrossLoraError
from crosslora.io.spool import Parked, Spool
from crosslora.methods.matched.stream import Streamed, run_layers
from crosslora.padding import right_padded

log = logging.getLogger("crosslora")

# role -> the input space it reads (q, k and v read the same tensor, as do gate and up)
INPUT_SPACE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
               "gate": "mlp_in", "up": "mlp_in", "down": "mlp_mid"}  # fmt: skip
SKIP_TOKENS = 4
TOP_P = 0.95
TOP_K = 1024  # nucleus sampling within the 1024 likeliest tokens (no full-vocabulary sort)
MAX_PIECES = 1.5  # tokens per aligned position, on either side, for a text both models read
LOOP_CHARS, MAX_REPEATED = 16, 0.3  # prose repeats <= 0.2 of its 16-grams, loops >= 0.35
TRIES = 3  # texts sampled, at most, per text asked for


class Kept(Mapping):
    """Activations kept in memory: each key's rows (N, n) come in pieces as they are computed and
    are concatenated when first asked for."""

    def __init__(self) -> None:
        self._parts: dict[object, list] = {}

    def add(self, key: object, rows: torch.Tensor) -> None:
        self._parts.setdefault(key, []).append(rows)

    def __getitem__(self, key: object) -> torch.Tensor:
        parts = self._parts[key]
        if len(parts) > 1:
            parts[:] = [torch.cat(parts)]
        return parts[0]

    def __iter__(self) -> Iterator:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


class Spilled(Kept):
    """Activations parked in a ``Spool`` as they are computed; each key's rows (N, n) are read
    back into a fresh tensor when asked for, so only what a module uses is in memory."""

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self.spool = spool
        self._last: tuple[object, torch.Tensor] | None = None  # q, k and v read the same rows

    def add(self, key: object, rows: torch.Tensor) -> None:
        super().add(key, self.spool.put(rows))

    def __getitem__(self, key: object) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None
        parts: list[Parked] = self._parts[key]
        out = torch.empty(
            (sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype
        )
        start = 0
        for part in parts:
            self.spool.get(part, out[start : start + part.shape[0]])
            start += part.shape[0]
        self._last = (key, out)
        return out

    def index(self) -> list:
        """Where each key's rows lie in the spool, as JSON (``restore`` reads it back)."""
        return [[list(k) if isinstance(k, tuple) else k,
                 [[p.offset, list(p.shape), str(p.dtype).removeprefix("torch.")] for p in parts]]
                for k, parts in self._parts.items()]  # fmt: skip

    @classmethod
    def restore(cls, spool: Spool, index: list) -> Spilled:
        out = cls(spool)
        for key, parts in index:
            k = tuple(key) if isinstance(key, list) else key
            out._parts[k] = [Parked(o, tuple(shape), getattr(torch, dt)) for o, shape, dt in parts]
        return out


@dataclass
class Activations:
    """One model's activations at the aligned positions (see the module docstring): ``Kept`` in
    memory, or ``Spilled`` to disk."""

    inputs: Kept = field(default_factory=Kept)
    residual: Kept = field(default_factory=Kept)


def special_id(tokenizer, *names: str) -> int | None:
    """The first of the tokenizer's ``<name>_token_id`` that is set (``bos``, ``eos``, ``pad``)."""
    for name in names:
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            return int(tid)
    return None


@torch.no_grad()
def sample_texts(model, tokenizer, n: int, length: int, seed: int, batch: int = 16,
                 desc: str | None = None, keep=None) -> list[str]:  # fmt: skip
    """``n`` texts of ``length`` new tokens sampled from ``model`` from its start token alone
    (a progress bar labelled ``desc`` when given). With ``keep`` (text -> bool), only the texts
    it accepts, sampling on until ``n`` are kept or ``TRIES × n`` were sampled (the first ``n``
    are the same texts as without it)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    bar = tqdm(total=n * length, desc=desc, unit="tok", disable=desc is None)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = special_id(tokenizer, "bos", "eos", "pad")
    if start is None:
        raise CrossLoraError("a tokenizer has no BOS, EOS or pad token to start sampling from")
    texts: list[str] = []
    sampled, limit = 0, n if keep is None else TRIES * n
    while len(texts) < n and sampled < limit:
        rows = min(batch, n - len(texts), limit - sampled)
        bar.total = max(bar.total, (sampled + rows) * length)  # grows when sampling goes on
        ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
        cache = None
        step_ids = ids
        for _ in range(length):
            out = model(input_ids=step_ids, cache=cache, use_cache=True)
            cache = out.cache
            probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
            top_p, order = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)  # sorted, descending
            top_p = top_p * (top_p.cumsum(-1) - top_p < TOP_P)
            pick = torch.multinomial(top_p / top_p.sum(-1, keepdim=True), 1, generator=gen)
            step_ids = order.gather(-1, pick).to(device)
            ids = torch.cat([ids, step_ids], dim=1)
            bar.update(len(ids))
        sampled += rows
        new = [t for t in tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True) if t.strip()]
        texts += new if keep is None else [t for t in new if keep(t)]
    bar.close()
    if keep is not None and len(texts) < n:
        log.info("%d of %d sampled texts are readable by both models", len(texts), sampled)
    return texts


def readable(text: str, tok_s, tok_t) -> bool:
    """Whether both models read ``text`` as text (see the module docstring): at most
    ``MAX_PIECES`` tokens of each tokenizer per aligned position, and not a loop."""
    grams = [text[i : i + LOOP_CHARS] for i in range(len(text) - LOOP_CHARS + 1)]
    if len(grams) - len(set(grams)) > MAX_REPEATED * len(grams):
        return False
    ends_s, ends_t = _encode(tok_s, text)[1], _encode(tok_t, text)[1]
    common = len(set(ends_s) & set(ends_t))
    return common > 0 and max(len(ends_s), len(ends_t)) <= MAX_PIECES * common


def _encode(tokenizer, text: str) -> tuple[list[int], dict[int, int]]:
    """Token ids (with the model's own special tokens) and char end offset -> token index."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ends: dict[int, int] = {}
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and i >= SKIP_TOKENS:
            ends[end] = i  # a later token ending at the same place (rare) wins
    return enc["input_ids"], ends


@dataclass
class ProbeBatch:
    """Texts tokenized for one model, and the aligned token positions in each."""

    ids: list[list[int]]
    positions: list[list[int]]


def align(texts: list[str], tok_s, tok_t) -> tuple[ProbeBatch, ProbeBatch]:
    """Per text, the token positions of the two tokenizations that end at the same character."""
    if not getattr(tok_s, "is_fast", False) or not getattr(tok_t, "is_fast", False):
        raise CrossLoraError("the matched method needs fast tokenizers (character offsets)")
    src, tgt = ProbeBatch([], []), ProbeBatch([], [])
    for text in texts:
        ids_s, ends_s = _encode(tok_s, text)
        ids_t, ends_t = _encode(tok_t, text)
        common = sorted(set(ends_s) & set(ends_t))
        src.ids.append(ids_s)
        tgt.ids.append(ids_t)
        src.positions.append([ends_s[e] for e in common])
        tgt.positions.append([ends_t[e] for e in common])
    return src, tgt


def _input_modules(layout: Layout) -> dict[str, tuple[int, str]]:
    """Module path -> (layer, input space), one module per (layer, input space)."""
    seen: dict[tuple[int, str], str] = {}
    for ref in layout.roles():
        key = (ref.layer, INPUT_SPACE[ref.role])
        seen.setdefault(key, ref.slot.module)
    return {module: key for key, module in seen.items()}


def input_widths(layout: Layout) -> dict[tuple[int, str], int]:
    """(layer, input space) -> its width, for every input space the layout's roles read."""
    return {(ref.layer, INPUT_SPACE[ref.role]): ref.shape[1] for ref in layout.roles()}


def activation_bytes(layout: Layout, positions: int) -> list[int]:
    """What ``collect`` keeps for ``positions`` aligned positions, per layer: one float32 row per
    position for each input space (``_input_modules``) and for the residual stream."""
    per_layer = [layout.dims.hidden] * layout.num_layers
    for (layer, _), n in input_widths(layout).items():
        per_layer[layer] += n
    return [4 * positions * n for n in per_layer]


@contextmanager
def _recording(model, targets: dict[str, tuple[Kept, object]], rows) -> Iterator[None]:
    """Forward pre-hooks on ``model``'s modules ``targets`` (path -> (store, key)) adding their
    input's rows ``rows`` (sequence indices, positions) to the store under the key."""

    def hook_for(store: Kept, key):
        def hook(_module, args, kwargs=None):
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            store.add(key, x[rows].float().cpu())

        return hook

    handles = []
    try:
        for path, (store, key) in targets.items():
            try:
                sub = model.get_submodule(path)
            except AttributeError as err:
                raise CrossLoraError(f"the loaded model has no module {path}") from err
            handles.append(sub.register_forward_pre_hook(hook_for(store, key), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def collect(
    run: Streamed,
    layout: Layout,
    batch: ProbeBatch,
    pad_id: int,
    chunk: int = 8,
    spool: Spool | None = None,
) -> Activations:
    """Run the model (``run``, one layer at a time) over ``batch`` and keep the activations at
    its aligned positions: parked in ``spool`` as they come when one is given (``Spilled``),
    else in memory."""
    acts = Activations(Spilled(spool), Spilled(spool)) if spool is not None else Activations()
    chunks, rows = [], []
    for lo in range(0, len(batch.ids), chunk):
        chunks.append(right_padded(batch.ids[lo : lo + chunk], pad_id))
        pos = batch.positions[lo : lo + chunk]
        b = torch.tensor([j for j, p in enumerate(pos) for _ in p], dtype=torch.long)
        p = torch.tensor([x for q in pos for x in q], dtype=torch.long)
        rows.append((b.to(run.device), p.to(run.device)))
    targets: list[dict[str, tuple[Kept, object]]] = [
        {f"{layout.family.layers}.{i}": (acts.residual, i)} for i in range(layout.num_layers)
    ]
    for module, key in _input_modules(layout).items():
        targets[key[0]][module] = (acts.inputs, key)
    bar = f"probe activations ({run.what})" if log.isEnabledFor(logging.INFO) else None
    run_layers(run, chunks, around=lambda i, _v, c: _recording(run.skeleton, targets[i], rows[c]),
               desc=bar)  # fmt: skip
    return acts
