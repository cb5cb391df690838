"""The fast SVD path (randomized block Krylov iteration) against the exact one: subspaces, signs,
the transferred ΔW, and the fall-back to the exact SVD where the fast path cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import make_adapter, transfer_argv
from crosslora.cli import main
from crosslora.linalg import FastSvd, all_finite, complete_basis, svd_bases


def decaying(m: int, n: int, seed: int, alpha: float = 0.5) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with s_i = i^-alpha and random orthonormal factors: near-equal singular
    values everywhere past the top few, the hard case for an iterative method."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, p + 1, dtype=torch.float64) ** -alpha
    return ((u * s) @ v.T).float()


def max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.linalg.svdvals(a.double().T @ b.double()).min().clamp(max=1.0)
    return float(torch.arccos(cos))


def cross_lora_delta(bases_s, bases_t, A, B) -> torch.Tensor:
    (u_s, _, v_s), (u_t, _, v_t) = bases_s, bases_t
    return (u_t @ (u_s.T @ B)) @ ((A @ v_s) @ v_t.T)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("m", "n"), [(480, 480), (720, 480), (480, 640)])
def test_fast_bases_match_exact_on_a_decaying_spectrum(m, n):
    k = 40
    assert FastSvd().applies((m, n), k)
    w_s, w_t = decaying(m, n, seed=1), decaying(m, n, seed=2)
    exact = [svd_bases(w, k, k, "exact") for w in (w_s, w_t)]
    fast = [svd_bases(w, k, k, "fast") for w in (w_s, w_t)]
    for (ue, se, ve), (uf, sf, vf) in zip(exact, fast):
        assert uf.shape == (m, k) and vf.shape == (n, k) and sf.shape == (k,)
        assert max_principal_angle(ue, uf) < 1e-2
        assert max_principal_angle(ve, vf) < 1e-2
        assert rel(sf, se[:k]) < 1e-5
        # the same vectors with the same signs, one by one
        assert float((ue - uf).norm(dim=0).max()) < 5e-2
        assert float((ve - vf).norm(dim=0).max()) < 5e-2
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(16, n, generator=g), torch.randn(m, 16, generator=g)
    want = cross_lora_delta(*exact, A, B)
    got = cross_lora_delta(*fast, A, B)
    assert rel(got, want) < 1e-2


@pytest.mark.parametrize("off", [0.0, 3e-4])
def test_rayleigh_ritz_undoes_a_basis_that_is_not_orthonormal(off):
    """The Ritz step recovers W's exact top triplets from any basis spanning them: one that is
    orthonormal (used as is) and one whose Gram matrix is off by up to 3e-4 (corrected by
    ``C⁻¹ H C⁻ᵀ``; used as if orthonormal it would be off by ~1e-4)."""
    from crosslora.linalg import _rayleigh_ritz

    g = torch.Generator().manual_seed(9)
    m, n, rank, size = 300, 200, 12, 20
    u = torch.linalg.qr(torch.randn(m, size, generator=g, dtype=torch.float64)).Q
    w = (u[:, :rank] * torch.linspace(3, 1, rank, dtype=torch.float64)) @ torch.linalg.qr(
        torch.randn(n, rank, generator=g, dtype=torch.float64)).Q.T  # fmt: skip
    skew = torch.randn(size, size, generator=g, dtype=torch.float64)
    basis = (torch.eye(size, dtype=torch.float64) + off / 2 * skew / skew.abs().max()) @ u.T
    gram_off = float((basis @ basis.T - torch.eye(size, dtype=torch.float64)).abs().max())
    assert (gram_off > 1e-6) == (off > 0)
    us, ss, vs = _rayleigh_ritz(w, basis, basis @ w, (w @ w.T @ basis.T).T, rank)
    ue, se, vhe = torch.linalg.svd(w)
    assert float((ss - se[:rank]).abs().max()) < 1e-10
    assert float(((us * ss) @ vs.T - w).abs().max()) < 1e-10


def test_fast_path_keeps_the_sign_convention():
    u, _, v = svd_bases(decaying(480, 480, seed=4), 40, 40, "fast")
    top = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    assert bool((top > 0).all())
    w = decaying(480, 480, seed=4)
    # u_i and v_i are a singular pair with the same sign: uᵢᵀ W vᵢ = σᵢ > 0
    assert bool(((u.T @ w @ v).diagonal() > 0).all())


def test_accuracy_knobs_tighten_the_result():
    w = decaying(600, 600, seed=5)
    exact, _, _ = svd_bases(w, 48, 48, "exact")
    loose = svd_bases(w, 48, 48, "fast", FastSvd(block=0.25, steps=1))[0]
    tight = svd_bases(w, 48, 48, "fast", FastSvd(block=0.5, steps=12))[0]
    assert max_principal_angle(exact, tight) < max_principal_angle(exact, loose) / 10


@pytest.mark.parametrize("rank", [0, 5])
def test_fast_path_on_a_matrix_of_low_rank(rank):
    """Rank below the Krylov dimension: the blocks degenerate, the result stays finite and the
    nonzero triplets match the exact ones (a zero matrix: all σ = 0, zero right vectors)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(600, rank, generator=g) @ torch.randn(rank, 500, generator=g)
    assert FastSvd().applies(w.shape, 40)
    u, s, v = svd_bases(w, 40, 40, "fast")
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, v))
    ue, se, ve = svd_bases(w, 40, 40, "exact")
    assert float((s[:rank] - se[:rank]).abs().sum()) < 1e-4 * float(se[0].clamp_min(1))
    assert float(s[rank:].abs().max()) < 1e-3 * float(se[0].clamp_min(1))
    top = (u[:, :rank] * s[:rank]) @ v[:, :rank].T
    want = (ue[:, :rank] * se[:rank]) @ ve[:, :rank].T
    assert float((top - want).norm()) <= 1e-4 * float(want.norm().clamp_min(1))


@pytest.mark.parametrize(("shape", "k"), [((64, 48), 64), ((48, 64), 64)])
def test_null_space_completion_runs_the_exact_svd(shape, k):
    """k > min(m, n) needs null-space columns: the fast path runs the exact one (thin SVD, then
    ``complete_basis``), bit-identical, the identity property at full rank included."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    kl, kr = min(k, shape[0]), min(k, shape[1])
    for a, b in zip(svd_bases(w, kl, kr, "fast"), svd_bases(w, kl, kr, "exact")):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("n", "p", "k"), [(40, 16, 40), (40, 16, 25), (7, 3, 7)])
def test_null_space_columns_depend_on_the_span_alone(n, p, k):
    """The columns past min(m, n) are orthonormal, orthogonal to the paired ones, complete at
    k = n, and a function of the paired columns' span: another basis of that span (as another
    LAPACK, or cuSOLVER, might return) gives the same new columns, so no device or library
    chooses them."""
    g = torch.Generator().manual_seed(11)
    q = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))[0]
    rot = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    a, b = complete_basis(q, k), complete_basis(q @ rot, k)
    assert a.shape == (n, k) and torch.equal(a[:, :p], q)
    assert float((a.T @ a - torch.eye(k, dtype=a.dtype)).abs().max()) < 1e-12
    assert float((a[:, p:] - b[:, p:]).abs().max()) < 1e-10
    if k == n:
        assert float((a @ a.T - torch.eye(n, dtype=a.dtype)).abs().max()) < 1e-12
    assert torch.equal(complete_basis(q, p), q)


@pytest.mark.parametrize(("shape", "k"), [((64, 48), 48), ((300, 300), 120), ((200, 900), 100)])
def test_large_k_takes_the_gram_eigendecomposition(shape, k):
    """k close to min(m, n): no Krylov space would be much smaller than the matrix, so the fast
    path decomposes the float64 Gram matrix; the same triplets and signs as the exact SVD."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    assert not FastSvd().applies(shape, k)
    (uf, sf, vf), (ue, se, ve) = (svd_bases(w, k, k, mode) for mode in ("fast", "exact"))
    assert uf.shape == ue.shape and vf.shape == ve.shape and sf.shape == (k,)
    assert rel(sf, se[:k]) < 1e-5
    assert float((uf - ue).norm(dim=0).max()) < 1e-3
    assert float((vf - ve).norm(dim=0).max()) < 1e-3


# --- end to end: `--svd fast` (the default) against `--svd exact` ------------------------------


def spectral_model(path: Path, seed: int) -> Path:
    """A one-layer llama (hidden 512) whose projection weights have decaying spectra."""
    config = tf.LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=768,
                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 2 and "proj" in name:
                p.copy_(decaying(*p.shape, seed=seed * 100 + i) * 3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spectral_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral")
    src, tgt = spectral_model(root / "src", 1), spectral_model(root / "tgt", 2)
    return src, tgt, make_adapter(src, root / "adapter", r=8)


def test_fast_transfer_matches_exact_transfer(spectral_pair, tmp_path):
    src, tgt, adapter = spectral_pair
    outs = {}
    for mode in ("fast", "exact"):
        argv = transfer_argv(adapter, src, tgt, tmp_path / mode, "cross-lora", "-q",
                             "--truncation-rank", "40", "--svd", mode, "--no-cache")  # fmt: skip
        assert main(argv) == 0
        outs[mode] = load_file(tmp_path / mode / "adapter_model.safetensors")
        report = json.loads((tmp_path / mode / "transfer_report.json").read_text())
        assert report["settings"]["svd"] == mode
    fast, exact = outs["fast"], outs["exact"]
    modules = sorted(k.removesuffix(".lora_A.weight") for k in fast if ".lora_A." in k)
    assert len(modules) == 7
    for module in modules:
        delta = {m: o[f"{module}.lora_B.weight"] @ o[f"{module}.lora_A.weight"]
                 for m, o in outs.items()}  # fmt: skip
        assert rel(delta["fast"], delta["exact"]) < 1e-2, module
        assert not torch.equal(fast[f"{module}.lora_A.weight"], exact[f"{module}.lora_A.weight"])


def test_all_finite_checks_entries_when_the_sum_overflows():
    big = torch.full((4, 4), 3e38)  # finite entries whose float32 sum overflows to inf
    assert all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.ones(64, 64)
        w[17, 3] = bad
        assert not all_finite(w)
    w = big.clone()
    w[0, 0] = float("nan")
    assert not all_finite(w)


def test_gram_path_on_a_matrix_of_low_rank():
    """σ = 0 past the rank: finite, the nonzero triplets exact; past the rank the smaller side's
    vectors are the Gram matrix's eigenvectors and the larger side's are zero."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(100, 5, generator=g) @ torch.randn(5, 80, generator=g)
    assert not FastSvd().applies(w.shape, 60)
    u, s, v = svd_bases(w, 60, 60, "fast")
    ue, se, ve = svd_bases(w, 60, 60, "exact")
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, v))
    assert rel(s[:5], se[:5]) < 1e-5
    assert float(u[:, 5:].abs().max()) == 0.0  # m > n: U is the larger side
    assert torch.allclose(v.T @ v, torch.eye(60), atol=1e-5)
    top = (u[:, :5] * s[:5]) @ v[:, :5].T
    assert rel(top, w) < 1e-5
