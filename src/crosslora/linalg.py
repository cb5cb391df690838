"""Small linear-algebra pieces the methods share: SVD bases with a fixed sign convention, exact
(the full SVD, paper-faithful) or fast (randomized block Krylov, for 7B-70B base weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SVD_MODES = ("fast", "exact")


@dataclass(frozen=True)
class FastSvd:
    """Accuracy controls of the fast path (randomized block Krylov iteration, ``randomized_svd``).

    A Gaussian start block of ``b = ceil(block · k)`` columns (``k`` the larger requested rank)
    and ``steps`` products with ``W Wᵀ`` span a Krylov space of dimension ``L = b (steps + 1)``;
    the top-k triplets of the Rayleigh-Ritz projection onto it are returned. The error of the
    i-th direction falls like a Chebyshev polynomial of degree ``steps`` in the gap between σ_i
    and the unresolved spectrum, much faster than plain power iteration for the same work. On
    the hard case, a slowly decaying spectrum (σ_i ∝ i^-0.5: near-equal singular values at the
    cut) at k/min(m, n) = 0.08, the defaults measured the transferred ΔW within ~1e-4 of the
    exact path's, the level at which float32 SVDs themselves agree (``tests/test_fast_svd.py``,
    ``bench/perf.py``); raise either knob for more.

    The exact SVD runs instead (same results as ``mode="exact"``) when the Krylov space would not
    be much smaller than the matrix, ``L > max_fraction · min(m, n)``, which covers every ``k``
    past ``min(m, n)`` (null-space completion needs the complete SVD).
    """

    block: float = 0.25
    steps: int = 14
    max_fraction: float = 0.6
    seed: int = 0

    def block_size(self, k: int) -> int:
        return max(1, -(-int(self.block * k * 1000) // 1000))  # ceil without float surprises

    def dimension(self, k: int) -> int:
        return self.block_size(k) * (self.steps + 1)

    def applies(self, shape: tuple[int, int], k: int) -> bool:
        """Whether the fast path runs (else the exact SVD) for a matrix and rank ``k``."""
        p = min(shape)
        return k <= p and self.dimension(k) <= self.max_fraction * p

    def key(self) -> dict:
        return {"method": "block-krylov", "block": self.block, "steps": self.steps,
                "max_fraction": self.max_fraction, "seed": self.seed}  # fmt: skip


DEFAULT_FAST = FastSvd()


def fix_signs(
    u: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic signs: flip each column of ``u`` so its largest-magnitude entry is positive.

    Singular pairs (u_i, v_i) are defined only up to a joint sign; ``v``'s matching columns (the
    first ``min`` of them) flip with ``u``'s. Ties go to the first index (``argmax``).
    """
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx[None, :]))[0]
    signs[signs == 0] = 1
    u = u * signs
    if v is not None:
        k = min(u.shape[1], v.shape[1])
        v = torch.cat([v[:, :k] * signs[:k], v[:, k:]], dim=1)
    return u, v


def svd_bases(
    w: torch.Tensor,
    k_left: int,
    k_right: int,
    mode: str = "exact",
    fast: FastSvd = DEFAULT_FAST,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular bases of ``w`` (m, n): ``U`` (m, k_left), ``S``, ``V`` (n, k_right).

    When a ``k`` exceeds ``min(m, n)`` the extra columns complete the basis from the null space
    (the full SVD), so at ``k_left = m`` and ``k_right = n`` the bases are complete and
    ``U Uᵀ = I``, ``V Vᵀ = I``. Signs follow ``fix_signs`` on the paired columns; null-space
    columns are signed by the same rule on their own.

    ``mode="fast"`` computes the top ``max(k_left, k_right)`` triplets by randomized block Krylov
    iteration (``FastSvd``), falling back to the exact SVD where that would not pay off or
    cannot serve (null-space completion). ``S`` then holds only those ``k`` values.
    """
    if mode not in SVD_MODES:
        raise ValueError(f"svd mode {mode!r}: choose from {', '.join(SVD_MODES)}")
    m, n = w.shape
    k = max(k_left, k_right)
    if mode == "fast" and fast.applies((m, n), k):
        u, s, v = randomized_svd(w, k, fast)
        u, v = fix_signs(u, v)
        return u[:, :k_left], s, v[:, :k_right]
    full = k > min(m, n)
    u, s, vh = torch.linalg.svd(w, full_matrices=full)
    v = vh.mT
    p = min(m, n)
    u_pair, v_pair = fix_signs(u[:, :p], v[:, :p])
    u = torch.cat([u_pair, fix_signs(u[:, p:])[0]], dim=1) if u.shape[1] > p else u_pair
    v = torch.cat([v_pair, fix_signs(v[:, p:])[0]], dim=1) if v.shape[1] > p else v_pair
    return u[:, :k_left], s, v[:, :k_right]


def randomized_svd(
    w: torch.Tensor, k: int, fast: FastSvd = DEFAULT_FAST
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U, S, V)`` of ``w`` by randomized block Krylov iteration.

    A fixed-seed Gaussian block (reproducible run to run), then ``steps`` products with ``W Wᵀ``,
    each new block orthogonalised against the earlier ones (block Gram-Schmidt, then
    Cholesky-QR). The blocks ``Y`` (m, L) are kept with their images ``Z = Wᵀ Y`` (n, L), which
    the iteration computes anyway (one more product for the last block), so Rayleigh-Ritz needs
    no further pass over ``W``: with ``G = YᵀY = C Cᵀ`` (Cholesky; ``Y`` is orthonormal up to
    round-off) the top eigenpairs ``(s², e)`` of ``C⁻¹ (ZᵀZ) C⁻ᵀ`` give ``U = Y C⁻ᵀ e`` and
    ``V = Z C⁻ᵀ e / s``. If ``W`` has rank below L the blocks degenerate and ``Y`` is
    orthonormalised by QR instead, at the cost of one more product. The L × L Gram matrices are
    formed in float64 (the squared condition number stays harmless). Everything large is a
    matrix product (LAPACK's QR and SVD are several times slower than GEMM on CPUs). Cost:
    ``2·steps + 1`` products of ``b`` columns with ``W``, the block orthogonalisation and two
    Gram matrices, against ``O(m n min(m, n))`` with a large constant for the full SVD.
    """
    m, n = w.shape
    if m > n:  # the Krylov basis in the smaller space: its orthogonalisation costs less
        v, s, u = randomized_svd(w.mT, k, fast)
        return u, s, v
    b = min(fast.block_size(k), m, n)
    gen = torch.Generator(device=w.device).manual_seed(fast.seed)
    omega = torch.randn(n, b, generator=gen, device=w.device, dtype=w.dtype)
    y = _orth(w @ omega, passes=1)
    del omega
    blocks, images = [y], []
    for _ in range(fast.steps):
        z = w.mT @ y
        images.append(z)
        y = w @ z
        for prev in blocks:  # keep the blocks from collapsing onto the dominant directions
            y = y - prev @ (prev.mT @ y)
        y = _orth(y, passes=1)
        blocks.append(y)
    images.append(w.mT @ y)
    basis, image = torch.cat(blocks, dim=1), torch.cat(images, dim=1)  # (m, L), (n, L)
    del blocks, images, y
    gram = basis.double().mT @ basis.double()
    with one_thread():
        chol, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if int(info) != 0 or not float((gram - eye).abs().max()) < 1e-3:
        # W (numerically) of rank below L: the blocks degenerated; orthonormalise, one more product
        basis = torch.linalg.qr(basis).Q
        image = w.mT @ basis
        chol = eye
    h = image.double().mT @ image.double()
    with one_thread():
        c_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        h = c_inv @ h @ c_inv.mT
        evals, evecs = torch.linalg.eigh((h + h.mT) / 2)  # ascending
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    s = evals.clamp_min(0).sqrt()
    coef = c_inv.mT @ evecs
    u = basis @ coef.to(w.dtype)
    inv_s = torch.where(s > torch.finfo(w.dtype).tiny, 1 / s, 0)  # zero columns for zero σ
    v = image @ (coef * inv_s).to(w.dtype)
    return u, s.to(w.dtype), v


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the small dense factorisations (l × l, l ≤ a few thousand) on one thread.

    A second thread gains little there, and on a CPU shared with other busy processes OpenMP's
    waiting threads make LAPACK's eigh or SVD of a 640 × 640 matrix take seconds instead of a
    fifth of one (measured: 14 s against 0.2 s). The large products stay multi-threaded.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _orth(y: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """An orthonormal basis of ``y``'s columns by Cholesky-QR (Gram in float64; ``passes=2``
    for orthonormality to working precision, one pass keeps the span, which is all a power step
    needs), falling back to Householder QR if the Gram matrix is numerically singular."""
    for _ in range(passes):
        gram = y.double().mT @ y.double()
        with one_thread():
            chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        y = torch.linalg.solve_triangular(chol.to(y.dtype), y.mT, upper=False).mT
    return y
