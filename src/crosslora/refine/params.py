"""The refine's parameters (``--refine``; the Python API's ``RefineParams``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from crosslora.errors import CrossLoraError

OBJECTIVES = ("shift", "nll", "kl", "auto")
STARTS = ("transfer", "untrained")


@dataclass(frozen=True)
class RefineParams:
    """What the teacher writes, what is kept of it, and how the student trains.

    ``prompts``: a few unlabeled task inputs that seed the teacher (empty: data-free, the teacher
    writes from a document start). The teacher writes ``oversample × texts`` texts of up to
    ``text_tokens`` new tokens; the ``texts`` whose tokens the adapter moves most (mean excess)
    are kept, and of each the ``token_keep`` fraction where it moves them most. The student
    trains ``steps`` steps (None: ``epochs`` passes over the kept texts) of ``batch`` texts with
    AdamW (``lr``, linear warm-up over a tenth of the steps, then linear decay), in forwards of
    ``micro_batch`` texts.
    """

    steps: int | None = None
    epochs: float = 2.0
    batch: int = 16
    micro_batch: int = 4
    lr: float = 2e-4
    # "shift": the student's own base distribution moved as the adapter moves the teacher's;
    # "nll": the teacher's tokens; "kl": its distribution (shared vocabulary); "auto": "nll" where
    # the source base reads the prompts at a lower NLL per character than the target base, else
    # "shift" (and "shift" without prompts)
    objective: str = "shift"
    start: str = "transfer"  # "transfer": the training-free transfer; "untrained": a new LoRA
    texts: int = 192
    oversample: float = 2.0
    token_keep: float = 0.5
    text_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    shots: int = 3  # seed prompts shown to the teacher per new task input
    max_rouge: float = 0.7  # a new task input is kept only below this ROUGE-L to every kept one
    top_k: int = 32  # the teacher's distribution kept per position ("kl")
    checkpoint_every: int = 25
    seed: int = 0
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise CrossLoraError(f"refine objective {self.objective!r}: choose from "
                                 f"{', '.join(OBJECTIVES)}")  # fmt: skip
        if self.start not in STARTS:
            raise CrossLoraError(f"refine start {self.start!r}: choose from {', '.join(STARTS)}")
        if self.steps is not None and self.steps < 1:
            raise CrossLoraError("refine steps must be at least 1")
        if not self.epochs > 0:
            raise CrossLoraError("refine epochs must be positive")
        for name in ("batch", "micro_batch", "texts", "text_tokens", "shots", "top_k",
                     "checkpoint_every"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise CrossLoraError(f"refine {name.replace('_', ' ')} must be at least 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise CrossLoraError("refine lr and temperature must be positive")
        if not 0 < self.token_keep <= 1 or not 0 < self.top_p <= 1 or not 0 < self.max_rouge <= 1:
            raise CrossLoraError("refine token keep, top-p and max ROUGE-L lie in (0, 1]")
        if not self.oversample >= 1:
            raise CrossLoraError("refine oversample must be at least 1")

    def steps_for(self, kept: int) -> int:
        """The training steps over ``kept`` texts: ``steps``, else ``epochs`` passes."""
        return self.steps or max(1, math.ceil(self.epochs * kept / self.batch))

    @property
    def generated(self) -> int:
        """How many texts the teacher writes."""
        return max(self.texts, round(self.texts * self.oversample))
