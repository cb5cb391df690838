"""The function-level calibration of ``matched`` (``methods.matched.calibrate``): its least squares, its
weight patching, and the chunk log-likelihoods it compares."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from crosslora.methods.matched import calibrate as cal
from crosslora.methods.matched.probe import ProbeBatch


def brute_force_nnls(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Projected gradient to convergence: an independent route to the same minimiser."""
    gram, rhs = x.mT @ x, x.mT @ y
    step = 1.0 / float(torch.linalg.eigvalsh(gram).max())
    c = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(20000):
        c = (c - step * (gram @ c - rhs)).clamp_min(0)
    return c


@pytest.mark.parametrize("seed", range(4))
def test_nonnegative_lstsq_finds_the_constrained_minimum(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, dtype=torch.float64, generator=gen)
    y = x @ torch.tensor([1.5, -2.0, 0.3, -0.1, 0.0], dtype=torch.float64)
    y = y + 0.3 * torch.randn(200, dtype=torch.float64, generator=gen)
    got = cal.nonnegative_lstsq(x, y)
    want = brute_force_nnls(x, y)
    assert (got >= 0).all()
    assert got[1] == 0 and got[3] == 0  # the negative directions are dropped
    loss = lambda c: float((x @ c - y).norm())  # noqa: E731
    assert loss(got) <= loss(want) + 1e-9
    assert torch.allclose(got, want, atol=1e-5)


def test_fit_scales_is_one_where_the_transfer_is_exact_and_recovers_known_scales():
    gen = torch.Generator().manual_seed(0)
    slopes = torch.randn(4, 300, dtype=torch.float64, generator=gen)
    full = slopes.sum(0) + 0.1 * torch.randn(300, dtype=torch.float64, generator=gen)
    assert torch.allclose(cal.fit_scales(full, full, slopes), torch.ones(4, dtype=torch.float64))
    want = torch.tensor([2.0, 0.5, 0.0, 1.25], dtype=torch.float64)
    d_s = full + slopes.mT @ (want - 1)
    assert torch.allclose(cal.fit_scales(d_s, full, slopes), want, atol=1e-9)
    # a role with no measurable part keeps its scale
    slopes[2] = 0
    assert cal.fit_scales(d_s, full, slopes)[2] == 1.0


def test_applied_adds_factored_updates_to_rows_of_outputs_and_leaves_the_model_as_it_was():
    """The same as patching the weights with ``scale · B A`` (rows of a fused output included,
    and a GPT-2 Conv1D, whose weight is stored (in, out)), without forming ``B A``."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(3, 6)  # nf=3 outputs from nx=6 inputs
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), conv)
    x = torch.randn(5, 4)
    before = model(x)
    rows = torch.tensor([1, 4])
    a0, b0, a1, b1 = torch.randn(2, 4), torch.randn(2, 2), torch.randn(2, 6), torch.randn(3, 2)
    ups = [cal.Update("0", rows, a0, b0, 0.5), cal.Update("1", None, a1, b1, 1.5)]
    with cal.applied(model, ups, scale=2.0):
        got = model(x)
    w0 = model[0].weight.detach().clone()
    w0[rows] += 2 * 0.5 * b0 @ a0
    w1 = conv.weight.detach() + (2 * 1.5 * b1 @ a1).mT
    want = (x @ w0.mT + model[0].bias) @ w1 + conv.bias
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(model(x), before)
    with pytest.raises(RuntimeError), cal.applied(model, ups):  # removed on errors too
        raise RuntimeError("boom")
    assert torch.equal(model(x), before)


class Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution depends on the current token only."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


class BigramRun:
    """``Streamed``'s interface over ``Bigram``: no layers, the logits its table's rows."""

    n, device, skeleton = 0, torch.device("cpu"), None
    layout = SimpleNamespace(family=SimpleNamespace(layers="layers"))

    def __init__(self, model):
        self.model = model

    def layer_inputs(self, ids, mask):
        return ids, []

    def logits(self, ids, mask, last):
        return self.model(last).logits


def test_chunk_loglik_is_the_log_probability_of_each_chunk():
    model = Bigram()
    ids = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]]
    positions = [[1, 4, 7], [0, 2]]
    (got,) = cal.chunk_logliks(BigramRun(model), ProbeBatch(ids, positions), pad_id=0,
                               variants=[[]], chunk=1)
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    want = []
    for seq, pos in zip(ids, positions):
        for a, b in itertools.pairwise(pos):  # tokens a+1..b, each predicted from its predecessor
            want.append(sum(float(logp[seq[i - 1], seq[i]]) for i in range(a + 1, b + 1)))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_agreement():
    d = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert cal.agreement(d, d) == {"corr": 1.0, "explained": 1.0}
    assert cal.agreement(d, 0 * d)["explained"] == 0.0
    assert cal.agreement(d, -d)["corr"] == -1.0


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.9])
def test_disattenuation_gives_the_geometric_mean_of_least_squares_and_major_axis_sizes(rho):
    """On effects correlated at ``rho``, least squares times the factor is the geometric mean of
    the least-squares slope and the reduced-major-axis one (the source's own strength)."""
    gen = torch.Generator().manual_seed(0)
    z, e = torch.randn(2, 5000, dtype=torch.float64, generator=gen)
    d_t = 0.7 * (rho * z + (1 - rho**2) ** 0.5 * e)
    d_s = 2.0 * z
    a, b = d_s - d_s.mean(), d_t - d_t.mean()
    corr = float(a @ b / (a.norm() * b.norm()))
    assert abs(corr - rho) < 0.03
    least_squares = float(a @ b / (b @ b))
    major_axis = float(a.norm() / b.norm())
    got = least_squares * cal.disattenuation(corr)
    assert abs(got - (least_squares * major_axis) ** 0.5) < 1e-9 * major_axis
    assert least_squares < got < major_axis


def test_disattenuation_leaves_exact_and_unrelated_transfers_alone():
    assert cal.disattenuation(1.0) == 1.0
    assert cal.disattenuation(0.0) == 1.0
    assert cal.disattenuation(-0.3) == 1.0
