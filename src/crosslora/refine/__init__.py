"""``--refine``: after the training-free transfer, distil the source adapter into the target on
text the source writes with it (Trans-LoRA, TiTok). Opt-in; the default path never trains.

The stages, each holding one model at a time: the teacher (the source with its adapter) writes
text and scores every token of it with and without the adapter (``teacher``); the texts and
tokens where the adapter acts most are kept and carried to the target's tokens by character
spans (``selection``, ``spans``); the student (the target with the transferred adapter, or a new
LoRA) trains on them (``student``). The reasoning is in docs/methods.md, "Refine".
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from crosslora.arch.layout import Layout
from crosslora.core import Inputs, ModuleTask, source_updates
from crosslora.errors import CrossLoraError
from crosslora.io.pretrained import load_model, require_tokenizer
from crosslora.lora import LoraFactors
from crosslora.memory import MemoryNeed, gb, parameter_bytes
from crosslora.refine import student, teacher
from crosslora.refine.params import RefineParams
from crosslora.refine.prompts import nll_per_char
from crosslora.refine.selection import select
from crosslora.speed import Work

__all__ = ["RefineParams", "refine", "memory", "flops"]

log = logging.getLogger("crosslora")
TEACHER = "teacher.json"
# sampling one token at a time runs far below the products' rate (a forward per token, the
# sampling over the whole vocabulary): fitted to the measured Gemma 3 -> SmolLM2 refine, whose
# texts took about 880 s against 115 s at the rate of the rest (docs/results.md, "Refine")
WRITING = 7.5


def refine(
    inputs: Inputs, tasks: list[ModuleTask], factors: list[tuple[str, LoraFactors]],
    params: RefineParams, device: torch.device, folder: Path | None = None, progress: bool = True,
) -> tuple[list[tuple[str, LoraFactors]], dict]:  # fmt: skip
    """The refined factors (the same modules, ranks and scales as ``factors``), and what the
    refine read and did. ``folder`` keeps the teacher's texts and the student's checkpoints, so
    that a refine interrupted there resumes."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    tok_s = require_tokenizer(inputs.src.checkpoint.path, "source model")
    tok_t = require_tokenizer(inputs.tgt.checkpoint.path, "target model")
    if not getattr(tok_s, "is_fast", False) or not getattr(tok_t, "is_fast", False):
        raise CrossLoraError("--refine needs fast tokenizers (character offsets)")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shared = _shared(tok_s, tok_t) if params.objective != "nll" else None
    auto = params.objective == "auto"
    if auto and not params.prompts:  # nothing both models read: the default objective
        params, auto = replace(params, objective="shift"), False
    reading: dict[str, float] = {}

    model = load_model(inputs.src.checkpoint.path, device, "source model", dtype)
    if auto:
        reading["source"] = float(nll_per_char(model, tok_s, params.prompts).mean())
    updates = source_updates(inputs, tasks)
    saved = folder / TEACHER if folder is not None else None
    if saved is not None and saved.is_file():
        texts = [teacher.Text(**t) for t in json.loads(saved.read_text())]
    else:
        with tqdm(total=params.generated, desc="refine: teacher", unit="text",
                  disable=not progress) as bar:  # fmt: skip
            texts = teacher.write(model, tok_s, updates, params, bar)
        if saved is not None:
            tmp = saved.with_suffix(".tmp")
            tmp.write_text(json.dumps([asdict(t) for t in texts]))
            tmp.replace(saved)
    if not texts:
        raise CrossLoraError("--refine: the teacher wrote no text")
    with tqdm(total=len(texts), desc="refine: scoring", unit="text", disable=not progress) as bar:
        scored = teacher.score(model, tok_s, texts, updates, shared, params.top_k, bar)
    del model, updates
    gc.collect()
    examples, counts = select(scored, tok_t, params)
    del scored
    if not examples:
        raise CrossLoraError("--refine: no teacher text survived selection (the target's "
                             "tokenizer reads none of them as two tokens or more)")  # fmt: skip
    taught = time.perf_counter() - start

    model = load_model(inputs.tgt.checkpoint.path, device, "target model", dtype)
    if auto:
        reading["target"] = float(nll_per_char(model, tok_t, params.prompts).mean())
        params = replace(params, objective=choose(reading["source"], reading["target"]))
        log.info("refine: the source reads the prompts at %.4f nats per character, the target at "
                 "%.4f: objective %s", reading["source"], reading["target"], params.objective)
    trainable = student.initial(factors, params.start, params.seed)
    with tqdm(total=params.steps_for(len(examples)), desc="refine: training", unit="step",
              disable=not progress) as bar:  # fmt: skip
        curve = student.train(model, trainable, examples, params, folder, bar)
    del model
    gc.collect()
    out = [(u.module, LoraFactors(u.A.detach().cpu(), u.B.detach().cpu(), u.scale))
           for u in trainable]  # fmt: skip
    chosen = {"objective_chosen_by": "auto", "prompt_nll_per_char": reading} if reading else {}
    report = {"objective": params.objective, **chosen, "start": params.start,
              "prompts": len(params.prompts), **counts, "batch": params.batch,
              "lr": params.lr, "seed": params.seed,
              "seconds_teacher": round(taught, 1),
              "seconds_training": round(time.perf_counter() - start - taught, 1),
              **curve}  # fmt: skip
    return out, report


def choose(source_nll: float, target_nll: float) -> str:
    """``--refine-objective auto``: ``nll`` (the teacher's tokens) where the source base reads
    the prompts at a lower NLL per character than the target base, else ``shift``. On the
    development task this picked the better of the two on all five pairs measured
    (docs/results.md, "Refine")."""
    return "nll" if source_nll < target_nll else "shift"


def _shared(tok_s, tok_t) -> tuple[torch.Tensor, torch.Tensor]:
    from crosslora.methods.anchored.vocab import shared_vocab

    v = shared_vocab(tok_s, tok_t)
    if len(v) == 0:
        raise CrossLoraError("--refine-objective kl/shift/auto: the two tokenizers share no token")
    return v.src_ids, v.tgt_ids


def key(inputs: Inputs, factors: list[tuple[str, LoraFactors]], params: RefineParams) -> str:
    """What decides a refine's result: both models, the adapter, the starting factors and the
    parameters (the folder name under the cache's ``refine/``)."""
    h = hashlib.sha256()
    for cp in (inputs.src.checkpoint, inputs.tgt.checkpoint):
        shards = sorted({cp.identity(k)["file"] for k in cp.keys()})
        h.update(json.dumps([[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns]
                             for f in shards]).encode())  # fmt: skip
    h.update(str(inputs.adapter.path.resolve()).encode())
    for name in sorted(inputs.adapter.modules):
        f = inputs.adapter.factors(name)
        h.update(f.A.float().numpy().tobytes() + f.B.float().numpy().tobytes())
    for module, f in factors:
        h.update(module.encode() + f.A.float().numpy().tobytes() + f.B.float().numpy().tobytes())
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    return h.hexdigest()


def memory(src: Layout, tgt: Layout, params: RefineParams, device: torch.device,
           rank: int) -> MemoryNeed:  # fmt: skip
    """The larger stage: the source whole (float32 on a CPU, bfloat16 on a GPU) scoring a batch
    of texts, or the target whole training (a LoRA of ``rank`` on every role it has, with
    gradients and AdamW moments, a micro-batch's activations and logits)."""
    per = 4 if device.type == "cpu" else 2
    tokens = 3 * params.text_tokens + 8  # a task input and the teacher's response
    score = parameter_bytes(src.checkpoint, per) + teacher.BATCH * tokens * src.dims.vocab * 4 * 3
    lora = sum(16 * rank * sum(ref.shape) for ref in tgt.roles())
    acts = params.micro_batch * tokens * tgt.dims.layers * (
        16 * tgt.dims.hidden + 4 * tgt.dims.intermediate) * 4  # fmt: skip
    logits = params.micro_batch * tokens * tgt.dims.vocab * 4 * 4
    train = parameter_bytes(tgt.checkpoint, per) + lora + acts + logits
    what = f"refine: the teacher {gb(score)}, the student's training {gb(train)}"
    need = max(score, train)
    return MemoryNeed(need, 0, what) if device.type == "cpu" else MemoryNeed(
        max(parameter_bytes(src.checkpoint, 2), parameter_bytes(tgt.checkpoint, 2)), need, what)


def flops(src: Layout, tgt: Layout, params: RefineParams) -> Work:
    """Writing (with a key/value cache), scoring twice, the target's base distribution on the
    kept texts (``shift``), and training (forward and backward through the frozen target, about
    twice a forward)."""
    p_s, p_t = parameter_bytes(src.checkpoint, 1), parameter_bytes(tgt.checkpoint, 1)
    tokens = 3 * params.text_tokens if params.prompts else params.text_tokens
    written = params.generated * (2 if params.prompts else 1) * params.text_tokens
    write = WRITING * 2 * p_s * written
    score = 2 * 2 * p_s * params.generated * tokens
    base = 2 * p_t * params.texts * tokens if params.objective in ("shift", "auto") else 0
    train = 3 * 2 * p_t * params.steps_for(params.texts) * params.batch * tokens
    return Work(write + score + base + train)
