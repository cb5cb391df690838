"""Maps between two models' residual streams fitted on their gradients, not their activations
(not a test; docs/results.md, sixteenth session).

Both models give a log-likelihood to each aligned chunk of the same probe text (``calibrate``'s
chunks). ``K`` random ± sums of one text's chunk log-likelihoods are ``K`` functionals both models
define; the gradient of each with respect to a constant added to the residual stream after layer
``l`` (at every position) is one row of ``G(l)`` (N, d). For a target layer and the source layer at
the same relative depth, ``T = argmin ‖G_t T − G_s‖² + λ ‖T‖²`` (d_t, d_s) sends a source direction
to the target direction that changes the text's likelihood alike, to first order.

Prints, per third target layer, how much of the source gradients the map predicts on held-out
texts (fitted on the first half of the texts, scored on the second) for several ridges, and the
correlation of the held-out effects of the source adapter's steering vector (its mean change to the
source's stream after each layer, at the aligned positions) with its mapped version's. Then adds
the mapped steering vector (fitted on all texts) to the target layer by layer and prints the
development task's mean gold-answer NLL for each factor:

    .venv/bin/python bench/dev/effect_map.py smollm2-135m gemma3-270m \\
        adapters/smollm2-135m-commonsense 0.5,1

64 probe texts from ``matched``'s sampler (seed ``SEED + 11``), 16 functionals each. Both models
in float32 on the CPU; about 21 minutes for SmolLM2 → Gemma 3 on two cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

import crosslora.methods.matched as mm
from crosslora.anchor.probe import ProbeBatch, align, load_model
from crosslora.anchor.vocab import load_tokenizer
from crosslora.eval import evaluate
from crosslora.zoo.models import model_path

DEV = str(Path(__file__).with_name("arc_dev.json"))
N_TEXTS, K = 64, 16
MAX_CHUNKS = 400  # signs drawn per text; a 96-token text has far fewer chunks
RIDGE = 1e-2  # relative to the mean eigenvalue of G_tᵀ G_t


def layers(model) -> torch.nn.ModuleList:
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return model.model.layers


def added(model, vectors: torch.Tensor) -> list:
    """Hooks adding ``vectors[l]`` to the output of every decoder layer ``l``."""

    def hook_for(v):
        def hook(_module, _args, out):
            return (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v

        return hook

    return [layer.register_forward_hook(hook_for(v)) for layer, v in zip(layers(model), vectors)]


def gradients(model, batch: ProbeBatch, signs: list[torch.Tensor]) -> torch.Tensor:
    """(L, N, d) float64: per layer, the gradient of every text's ``K`` signed sums of chunk
    log-likelihoods with respect to a constant added to the stream after that layer."""
    c = torch.zeros(len(layers(model)), model.config.hidden_size, requires_grad=True)
    hooks = added(model, c)
    rows = []
    for ids, pos, s in zip(batch.ids, batch.positions, signs):
        x = torch.tensor([ids])
        logits = model(input_ids=x, use_cache=False).logits[0].float()
        tok = logits[:-1].gather(-1, x[0, 1:, None])[:, 0] - logits[:-1].logsumexp(-1)
        cum = torch.cat([tok.new_zeros(1), tok.cumsum(0)])
        p = torch.tensor(pos)
        chunks = cum[p[1:]] - cum[p[:-1]]
        for k in range(K):
            f = (s[k, : len(chunks)] * chunks).sum()
            (g,) = torch.autograd.grad(f, c, retain_graph=k < K - 1)
            rows.append(g.double())
    for h in hooks:
        h.remove()
    return torch.stack(rows, 1)


@torch.no_grad()
def streams(model, batch: ProbeBatch) -> torch.Tensor:
    """(L, P, d) float64: the stream after every layer at the aligned positions."""
    out, rec = [], []

    def keep(_module, _args, o):
        rec.append((o[0] if isinstance(o, tuple) else o)[0])

    hooks = [layer.register_forward_hook(keep) for layer in layers(model)]
    for ids, pos in zip(batch.ids, batch.positions):
        rec.clear()
        model(input_ids=torch.tensor([ids]))
        out.append(torch.stack(rec)[:, pos].double())
    for h in hooks:
        h.remove()
    return torch.cat(out, 1)


def effect_map(g_s: torch.Tensor, g_t: torch.Tensor, ridge: float) -> torch.Tensor:
    """(d_t, d_s): ridge least squares of ``g_s`` (N, d_s) on ``g_t`` (N, d_t)."""
    gram = g_t.T @ g_t
    lam = ridge * gram.trace() / len(gram)
    eye = torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, g_t.T @ g_s)


def main(source: str, target: str, adapter: str, factors: str) -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ps, pt = model_path(source, must_exist=True), model_path(target, must_exist=True)
    tok_s, tok_t = load_tokenizer(ps, "source"), load_tokenizer(pt, "target")
    ms, mt = load_model(ps, cpu, "source"), load_model(pt, cpu, "target")
    with torch.no_grad():
        texts = mm.probe_texts(ms, tok_s, mt, tok_t, N_TEXTS, mm.SEED + 11)
    bs, bt = align(texts, tok_s, tok_t)
    signs = [torch.randint(0, 2, (K, MAX_CHUNKS)).float() * 2 - 1 for _ in texts]
    gs, gt = gradients(ms, bs, signs), gradients(mt, bt, signs)
    base = streams(ms, bs)  # before PEFT wraps the source model in place
    drift = (streams(PeftModel.from_pretrained(ms, adapter), bs) - base).mean(1)
    ls, lt, n = len(gs), len(gt), gs.shape[1]
    depth = [min(ls - 1, round((j + 1) * ls / lt) - 1) for j in range(lt)]
    fit, held = slice(0, n // 2), slice(n // 2, n)
    for ridge in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        cells = []
        for j in range(0, lt, 3):
            a, b, v = gs[depth[j]], gt[j], drift[depth[j]]
            t = effect_map(a[fit], b[fit], ridge)
            explained = 1 - (b[held] @ t - a[held]).norm() ** 2 / a[held].norm() ** 2
            corr = torch.corrcoef(torch.stack([a[held] @ v, b[held] @ t @ v]))[0, 1]
            cells.append(f"{j}: {explained:.2f} / {corr:.2f}")
        print(f"ridge {ridge:g}, held out (explained / steering corr):", "  ".join(cells))
    mapped = torch.stack(
        [effect_map(gs[depth[j]], gt[j], RIDGE) @ drift[depth[j]] for j in range(lt)]
    )
    steps = torch.diff(mapped, dim=0, prepend=torch.zeros_like(mapped[:1])).float()
    with torch.no_grad():
        for factor in (float(x) for x in factors.split(",")):
            hooks = added(mt, steps * factor)
            try:
                (task,) = evaluate(mt, tok_t, DEV, progress=False)["tasks"].values()
            finally:
                for h in hooks:
                    h.remove()
            print(f"steering x{factor:g}: development NLL {task['metrics']['nll']['value']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
