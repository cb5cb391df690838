"""Factored updates applied to a model's modules by forward hooks, as a LoRA layer computes them.

The calibration of ``matched`` and the refine's teacher and student read a model with an adapter
this way: nothing is merged into the weights and the model is as before once the hooks go.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Update:
    """A factored update of ``module``'s output features ``rows`` (None: all of them): the
    module's output gains ``scale · B A x`` for its input ``x``; ``A`` (r, in), ``B`` (out_rows, r).
    Acting on the output, it is the same for a Linear and a GPT-2-style Conv1D."""

    module: str
    rows: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0


@contextmanager
def applied(model, updates: Sequence[Update], scale: float = 1.0) -> Iterator[None]:
    """``model`` with every update (times ``scale``) added to its module's output by a forward
    hook, kept factored as a LoRA layer computes it; the model is as before once it is left."""

    weight = next(model.parameters())

    def hook_for(u: Update):
        a, b = u.A.to(weight.device, weight.dtype), u.B.to(weight.device, weight.dtype)
        rows = None if u.rows is None else u.rows.to(weight.device)

        def hook(_module, args, out):
            delta = (scale * u.scale) * ((args[0].to(out.dtype) @ a.mT) @ b.mT)
            if rows is None:
                return out + delta
            out = out.clone()
            out[..., rows] += delta
            return out

        return hook

    handles = []
    try:
        for u in updates:
            handles.append(model.get_submodule(u.module).register_forward_hook(hook_for(u)))
        yield
    finally:
        for h in handles:
            h.remove()
