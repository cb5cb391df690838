"""Small linear-algebra pieces the methods share: SVD bases with a fixed sign convention, exact
(the full SVD, paper-faithful) or fast (randomized block Krylov, for 7B-70B base weights)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SVD_MODES = ("fast", "exact")
DEFAULT_SVD = "fast"  # randomized block Krylov; "exact" is the full SVD, as the paper
DEFAULT_TRUNCATION_RANK = 320  # SVD components kept by the subspace methods (the paper's k)
ORTHONORMAL = 1e-6  # a Krylov basis whose Gram matrix is this close to I is used as orthonormal


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
    ``bench/perf.py``); raise either knob for more. For the same work, a thinner block with more
    steps resolves close singular values better: at 7B shapes and k = 320, ``block=0.125,
    steps=24`` (L = 1000) reached the same ΔW error as ``block=0.25, steps=14`` (L = 1200) on every
    role, in 9 % less time. Below that the error jumps (0.2 at 20 steps): the paper method pairs
    the i-th singular vectors one by one, and neighbours near k are 0.16 % apart there.

    Where the Krylov space would not be much smaller than the matrix, ``L > max_fraction ·
    min(m, n)``, the float64 Gram eigendecomposition (``gram_svd``) runs instead; for every ``k``
    past ``min(m, n)`` the exact SVD does (null-space completion needs the complete SVD).
    """

    block: float = 0.125
    steps: int = 24
    max_fraction: float = 0.6
    seed: int = 0

    def block_size(self, k: int) -> int:
        return max(1, -(-int(self.block * k * 1000) // 1000))  # ceil without float surprises

    def dimension(self, k: int) -> int:
        return self.block_size(k) * (self.steps + 1)

    def applies(self, shape: tuple[int, int], k: int) -> bool:
        """Whether the Krylov iteration runs (else ``gram_svd``) for a matrix and rank ``k``."""
        p = min(shape)
        return k <= p and self.dimension(k) <= self.max_fraction * p

    def key(self) -> dict:
        return {"method": "block-krylov-2", "block": self.block, "steps": self.steps,
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
    mode: str,
    fast: FastSvd = DEFAULT_FAST,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular bases of ``w`` (m, n): ``U`` (m, k_left), ``S``, ``V`` (n, k_right).

    When a ``k`` exceeds ``min(m, n)`` the extra columns complete the basis from the null space
    (``complete_basis``), so at ``k_left = m`` and ``k_right = n`` the bases are complete and
    ``U Uᵀ = I``, ``V Vᵀ = I``. Signs follow ``fix_signs`` on the paired columns.

    ``mode="fast"`` computes the top ``max(k_left, k_right)`` triplets by randomized block Krylov
    iteration (``FastSvd``). Where the Krylov space would not be much smaller than the matrix it
    takes them from the float64 eigendecomposition of the smaller Gram matrix instead
    (``gram_svd``), and where null-space columns are asked for it runs the exact SVD. ``S`` then
    holds only those ``k`` values. The bases are returned contiguous, so that a computed basis and
    the same basis read back from the cache give bit-identical products on every device.
    """
    if mode not in SVD_MODES:
        raise ValueError(f"svd mode {mode!r}: choose from {', '.join(SVD_MODES)}")
    m, n = w.shape
    k = max(k_left, k_right)
    if mode == "fast" and k <= min(m, n):
        u, s, v = randomized_svd(w, k, fast) if fast.applies((m, n), k) else gram_svd(w, k)
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.mT
    u, v = fix_signs(u, v)
    u, v = complete_basis(u, k_left), complete_basis(v, k_right)
    return u[:, :k_left].contiguous(), s, v[:, :k_right].contiguous()


def complete_basis(q: torch.Tensor, k: int) -> torch.Tensor:
    """``q`` (n, p), orthonormal columns, extended to ``k`` columns (p < k ≤ n) by an orthonormal
    basis of part of its complement; ``q`` itself where ``k ≤ p``.

    The null space of a complete SVD (or QR) is whatever basis LAPACK or cuSOLVER happens to
    return, and the two differ. Here the new columns are the orthonormal frame closest to a fixed
    pseudo-random Gaussian frame ``G`` (n, k − p; seeded, drawn on the CPU) projected onto the
    complement: ``X = (I − q qᵀ) G``, columns ``X (XᵀX)^(-1/2)`` (Löwdin's symmetric
    orthonormalisation, which makes no choice of order or sign). That is a function of ``q``'s span
    alone, computed in float64, the same on every device up to round-off.
    """
    n, p = q.shape
    if k <= p:
        return q
    g = torch.randn(n, k - p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    qd, x = q.double(), g.to(q.device)
    for _ in range(2):  # twice: orthogonal to q to round-off
        x = x - qd @ (qd.mT @ x)
    u, _, wh = torch.linalg.svd(x, full_matrices=False)
    extra = u @ wh  # X's polar factor X (XᵀX)^(-1/2), orthonormal to round-off however X is
    return torch.cat([q, extra.to(q.dtype)], dim=1)


def gram_svd(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``w`` (m, n) from the eigendecomposition of ``W Wᵀ`` (or
    ``Wᵀ W``, the smaller), formed and decomposed in float64: ``σᵢ`` is exact to ~1e-16 σ₁²/σᵢ²
    relative, far below float32 round-off for every direction above 1e-4 σ₁. For a 1024 × 4096
    weight it takes a fifth of the time of LAPACK's float32 SVD. ``V = Wᵀ U / S`` (zero columns
    where σ is at round-off level, as ``randomized_svd``)."""
    m, n = w.shape
    if m > n:
        v, s, u = gram_svd(w.mT, k)
        return u, s, v
    wd = w.double()
    with one_thread():
        evals, evecs = torch.linalg.eigh(wd @ wd.mT)  # ascending
    s = evals.flip(0)[:k].clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :k]
    v = (wd.mT @ u) * _inverse_above_noise(s)
    return u.to(w.dtype), s.to(w.dtype), v.to(w.dtype)


def randomized_svd(
    w: torch.Tensor, k: int, fast: FastSvd = DEFAULT_FAST
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets ``(U, S, V)`` of ``w`` by randomized block Krylov iteration.

    A fixed-seed Gaussian block (reproducible run to run), then ``steps`` products with ``W Wᵀ``,
    each new block orthogonalised against all the earlier ones (block classical Gram-Schmidt,
    two passes, then Cholesky-QR). The blocks ``Y`` (m, L) are kept with their images
    ``Z = Wᵀ Y`` (n, L) and ``W Z`` (m, L), which the iteration computes anyway (one more product
    for the last block), so Rayleigh-Ritz needs no further pass over ``W``: with
    ``G = YᵀY = C Cᵀ`` (Cholesky; ``Y`` is orthonormal up to round-off) and
    ``H = Yᵀ (W Z) = ZᵀZ``, the top eigenpairs ``(s², e)`` of ``C⁻¹ H C⁻ᵀ`` give
    ``U = Y C⁻ᵀ e`` and ``V = Z C⁻ᵀ e / s``; where ``G`` is within ``ORTHONORMAL`` of ``I`` (the
    usual case: two Gram-Schmidt passes leave ~3e-7) ``C = I``. ``Y`` lives in the smaller of the
    two spaces, so both L × L Gram matrices are formed there; ``H`` in float64 (the squared
    condition number stays harmless). If ``W`` has rank below L the blocks degenerate and ``Y``
    is orthonormalised by QR instead, at the cost of one more product. Everything large is a
    matrix product (LAPACK's QR and SVD are several times slower than GEMM on CPUs). The blocks
    are stored as rows (``Yᵀ``): a (b, m) block times ``W`` runs 15-30 % faster than ``W`` times
    an (m, b) block on one CPU thread. Cost: ``2·steps + 2`` products of ``b`` columns with
    ``W``, the orthogonalisation and a few m × L × L products, against
    ``O(m n min(m, n))`` with a large constant for the full SVD.
    """
    m, n = w.shape
    if m > n:  # the Krylov basis in the smaller space: its Gram matrices cost less
        v, s, u = randomized_svd(w.mT, k, fast)
        return u, s, v
    b = min(fast.block_size(k), m, n)
    size = b * (fast.steps + 1)
    gen = torch.Generator(device=w.device).manual_seed(fast.seed)
    omega = torch.randn(n, b, generator=gen, device=w.device, dtype=w.dtype)
    basis = torch.empty(size, m, device=w.device, dtype=w.dtype)  # Yᵀ
    image = torch.empty(size, n, device=w.device, dtype=w.dtype)  # Zᵀ = Yᵀ W
    back = torch.empty(size, m, device=w.device, dtype=w.dtype)  # (W Z)ᵀ
    basis[:b] = _orth(w @ omega, passes=1).mT
    del omega
    for j in range(fast.steps + 1):
        rows = slice(j * b, (j + 1) * b)
        torch.matmul(basis[rows], w, out=image[rows])
        y = back[rows]
        torch.matmul(image[rows], w.mT, out=y)
        if j < fast.steps:  # the next block: W Wᵀ y, kept from collapsing onto earlier blocks
            done = basis[: (j + 1) * b]
            for _ in range(2):  # twice is enough (one classical pass leaves ~1e-2 overlaps)
                y = y - (y @ done.mT) @ done
            basis[(j + 1) * b : (j + 2) * b] = _orth(y.mT, passes=1).mT
    return _rayleigh_ritz(w, basis, image, back, k)


def _rayleigh_ritz(
    w: torch.Tensor, basis: torch.Tensor, image: torch.Tensor, back: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` Ritz triplets of ``w`` (m, n) in the span of the rows of ``basis`` (L, m),
    ``Yᵀ``, given ``image = Yᵀ W`` (L, n) and ``back = (W Wᵀ Y)ᵀ`` (L, m); see ``randomized_svd``.
    """
    size = basis.shape[0]
    gram = (basis @ basis.mT).double()  # float32 is enough to see (and undo) non-orthonormality
    eye = torch.eye(size, dtype=gram.dtype, device=gram.device)
    off = float((gram - eye).abs().max())  # ~3e-7 after two Gram-Schmidt passes
    c_inv = None  # C⁻¹ for G = C Cᵀ, where Y is not orthonormal to ORTHONORMAL
    left, right = basis, back  # H = Yᵀ W Wᵀ Y = left rightᵀ
    if off > ORTHONORMAL:
        with one_thread():
            chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0 and off < 1e-3:
            with one_thread():
                c_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        else:  # W (numerically) of rank below L: the blocks degenerated; QR, one more product
            basis = torch.linalg.qr(basis.mT).Q.mT
            image = basis @ w
            left = right = image  # H = Zᵀ Z: no second product with W
    h = left.double() @ right.double().mT
    with one_thread():
        if c_inv is not None:  # C⁻¹ H C⁻ᵀ: Rayleigh-Ritz in the orthonormalised basis
            h = c_inv @ h @ c_inv.mT
        evals, evecs = torch.linalg.eigh((h + h.mT) / 2)  # ascending
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    s = evals.clamp_min(0).sqrt()
    coef = evecs if c_inv is None else c_inv.mT @ evecs
    u = basis.mT @ coef.to(w.dtype)
    v = image.mT @ (coef * _inverse_above_noise(s)).to(w.dtype)
    return u, s.to(w.dtype), v


def _inverse_above_noise(s: torch.Tensor) -> torch.Tensor:
    """``1/σ``, and 0 where ``σ ≤ 1e-6 σ₁``: below that a float32 weight's singular directions
    are round-off, and ``Wᵀ u / σ`` would be amplified noise, so those right vectors are zero."""
    return torch.where(s > s[:1].clamp_min(torch.finfo(s.dtype).tiny) * 1e-6, 1 / s, 0)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. The sum is finite exactly when every entry is, unless finite
    entries overflow it; only then is each entry checked (40x faster on large weights)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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


def safe_inverse(gain: torch.Tensor | None, rel_eps: float = 1e-3) -> torch.Tensor | None:
    """``1/g`` regularised near zero: ``g / (g² + ε²)`` with ε relative to the largest |g|."""
    if gain is None:
        return None
    eps = rel_eps * float(gain.abs().max().clamp_min(1e-12))
    return gain / (gain * gain + eps * eps)
