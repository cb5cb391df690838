"""The student: the target model with a trainable LoRA (the transferred adapter, or a new one),
trained on the teacher's selected tokens; checkpointed so that an interrupted refine resumes.

The LoRA stays factored: per module ``A`` (r, in) and ``B`` (out, r) in float32, applied by
forward hooks on the frozen model. Step ``s`` reads texts ``s · batch`` to ``(s + 1) · batch`` of
an endless sequence of seeded permutations, so a resumed run sees what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crosslora.hooks import Update, applied
from crosslora.lora import LoraFactors
from crosslora.padding import right_padded
from crosslora.refine.params import RefineParams
from crosslora.refine.selection import Example

CHECKPOINT = "checkpoint.safetensors"


def initial(factors: list[tuple[str, LoraFactors]], start: str, seed: int) -> list[Update]:
    """Trainable updates, one per module: the transfer's factors, balanced (``balanced``), or
    (``untrained``) PEFT's initialisation of a new LoRA of the same rank and scale (``A``
    Kaiming-uniform, ``B`` zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for module, f in factors:
        fresh = _kaiming(f.A.shape, gen)
        if start == "untrained":
            a, b = fresh, torch.zeros(f.B.shape)
        else:
            a, b = balanced(f.A.double(), f.B.double(), fresh.double())
        out.append(Update(module, None, torch.nn.Parameter(a.float().contiguous()),
                          torch.nn.Parameter(b.float().contiguous()), f.scale))  # fmt: skip
    return out


def balanced(a: torch.Tensor, b: torch.Tensor, fresh: torch.Tensor) -> tuple:
    """``(A', B')`` with ``B' A' = B A`` and each of the update's singular values split evenly
    between them (row ``i`` of ``A'`` and column ``i`` of ``B'`` both of norm ``√σ_i``); rows
    of a direction the update does not use (``σ_i`` ~ 0) are ``fresh``'s with ``B'`` zero there.

    Adam moves every element by about the learning rate whatever its size, so a transfer whose
    factors are far from balanced (``matched`` can write ``A`` of RMS 10 beside ``B`` = 0, a role
    calibrated away) would see a step of ``B`` act on ``A``'s whole size: the balanced factors
    give every direction the step size a trained LoRA has."""
    if min(b.shape[0], a.shape[1]) < a.shape[0]:
        return a, b  # wider than the module: nothing to split
    qb, rb = torch.linalg.qr(b)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.mT)  # (in, r), (r, r)
    u, sv, vh = torch.linalg.svd(rb @ ra.mT)
    root = sv.sqrt()
    b2, a2 = (qb @ u) * root, root[:, None] * (vh @ qa.mT)
    unused = sv <= 1e-6 * float(sv.max()) if float(sv.max()) > 0 else sv >= 0
    a2[unused], b2[:, unused] = fresh[unused], 0.0
    return a2, b2


def _kaiming(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """``kaiming_uniform_(a=√5)`` of an (r, in) matrix, as nn.Linear and PEFT initialise ``A``."""
    bound = 1 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def order(n: int, seed: int, step: int, batch: int) -> list[int]:
    """The example indices step ``step`` reads: its slice of seeded permutations laid end to end."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, at = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[at]))
    return out


def learning_rate(params: RefineParams, step: int, steps: int) -> float:
    """Linear warm-up over a tenth of the ``steps``, then linear decay to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return params.lr * (step + 1) / warm
    return params.lr * max(0.0, (steps - step) / max(1, steps - warm))


def _loss(model, updates: list[Update], batch: list[Example], objective: str, device) -> tuple:
    """The summed loss of ``batch`` (a tensor with its graph) and how many terms it sums."""
    ids, mask = (t.to(device) for t in right_padded([e.ids for e in batch], 0))
    with applied(model, updates):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    if objective == "nll":
        chosen = torch.zeros_like(ids, dtype=torch.bool)
        for j, e in enumerate(batch):
            chosen[j, : len(e.nll)] = torch.tensor(e.nll)
        chosen = chosen[:, 1:]  # logits at i predict token i + 1
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return -(lp[chosen]).sum(), int(chosen.sum())
    total, terms = logits.new_zeros(()), 0
    for j, e in enumerate(batch):
        if not e.kl_pos:
            continue
        pos = torch.tensor(e.kl_pos, device=device)
        q = torch.log_softmax(logits[j, pos].gather(-1, e.kl_ids.to(device)), dim=-1)
        if objective == "shift":  # the student's base, moved as the adapter moves the teacher
            p = torch.softmax(e.kl_base.to(device) + e.kl_shift.to(device), dim=-1)
        else:
            p = e.kl_p.to(device)
        total = total + (p * (p.clamp_min(1e-30).log() - q)).sum()
        terms += len(pos)
    return total, terms


def train(model, updates: list[Update], examples: list[Example], params: RefineParams,
          folder: Path | None, bar=None) -> dict:  # fmt: skip
    """Train ``updates`` in place for ``params.steps_for(len(examples))`` steps; returns them,
    the loss curve (mean loss per selected token or position, per step) and the step it resumed
    from (0: a fresh start).
    Every ``checkpoint_every`` steps the state goes to ``folder`` (when given)."""
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for u in updates:
        u.A.data, u.B.data = u.A.data.to(device), u.B.data.to(device)
    trained = [t for u in updates for t in (u.A, u.B)]
    # eps: gradients below 1e-6 (float noise where teacher and student agree) barely move it
    opt = torch.optim.AdamW(trained, lr=params.lr, weight_decay=0.0, eps=1e-6)
    losses: list[list[float]] = []
    begin = _resume(folder, trained, opt, losses) if folder is not None else 0
    if bar is not None:
        bar.update(begin)
    steps = params.steps_for(len(examples))
    if params.objective == "shift":
        _base_logprobs(model, examples, params.micro_batch, device)
    for step in range(begin, steps):
        picked = [examples[i] for i in order(len(examples), params.seed, step, params.batch)]
        for g in opt.param_groups:
            g["lr"] = learning_rate(params, step, steps)
        opt.zero_grad(set_to_none=True)
        mb = params.micro_batch
        parts = [picked[i : i + mb] for i in range(0, len(picked), mb)]
        terms = sum(_terms(e, params.objective) for e in picked)
        total = 0.0
        for part in parts:
            loss, _ = _loss(model, updates, part, params.objective, device)
            if terms:
                (loss / terms).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append([step + 1, round(total / max(terms, 1), 5)])
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            bar.update(1)
        if folder is not None and ((step + 1) % params.checkpoint_every == 0
                                   and step + 1 < steps):  # fmt: skip
            _save(folder, trained, opt, losses)
    for u in updates:
        u.A.requires_grad_(False)
        u.B.requires_grad_(False)
    return {"steps": steps, "loss_curve": losses, "resumed_from_step": begin}


@torch.no_grad()
def _base_logprobs(model, examples: list[Example], micro: int, device) -> None:
    """Each example's ``kl_base``: the student's base log-probabilities (no LoRA) of the
    teacher's tokens at its positions, renormalised over them."""
    for lo in range(0, len(examples), micro):
        part = examples[lo : lo + micro]
        ids, mask = (t.to(device) for t in right_padded([e.ids for e in part], 0))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for j, e in enumerate(part):
            pos = torch.tensor(e.kl_pos, dtype=torch.long, device=device)
            picked = logits[j, pos].gather(-1, e.kl_ids.to(device)) if e.kl_pos else None
            e.kl_base = (torch.log_softmax(picked, dim=-1).cpu() if picked is not None
                         else torch.zeros(0, e.kl_ids.shape[1]))  # fmt: skip


def _terms(e: Example, objective: str) -> int:
    return sum(e.nll[1:]) if objective == "nll" else len(e.kl_pos)


def _save(folder: Path, trained: list, opt, losses: list) -> None:
    """Parameters, optimizer moments and the loss curve, written whole or not at all."""
    tensors = {f"param.{i}": t.detach().cpu().contiguous() for i, t in enumerate(trained)}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"losses": json.dumps(losses)})
    os.replace(tmp, folder / CHECKPOINT)


def _resume(folder: Path, trained: list, opt, losses: list) -> int:
    """Load the checkpoint in ``folder`` if there is one; returns the step it ends at."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = json.loads(f.metadata()["losses"])
    tensors = load_file(str(path))
    with torch.no_grad():
        for i, t in enumerate(trained):
            t.copy_(tensors[f"param.{i}"])
    state = opt.state_dict()
    state["state"] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    losses[:] = saved
    return len(saved)
