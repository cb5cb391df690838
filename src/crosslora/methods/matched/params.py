"""``matched``'s parameters (``--method matched``; the Python API's ``MatchedParams``)."""

from __future__ import annotations

from dataclasses import dataclass

from crosslora.methods.base import Params


@dataclass(frozen=True)
class MatchedParams(Params):
    alpha: float = 1e-2  # ridge, relative to the mean eigenvalue of the Gram matrix
    n_texts: int = 64  # probe texts, half sampled from each model
    calibration_texts: int = 32  # of which the calibration reads (about 2,700 chunks)
    text_tokens: int = 96  # new tokens per probe text
    seed: int = 0
    draw_stride: int = 100  # draw i samples its probe text with seed seed + draw_stride · i
    min_positions: int = 256  # aligned positions needed to fit the maps
