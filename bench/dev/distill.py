"""What fitting the target adapter to the source adapter's effect on text would buy
(not a test, and not part of any method: it is training; docs/results.md, seventeenth session).

The source adapter's effect on a text is its change to the source's log-likelihood of every
aligned chunk (``calibrate``'s chunks: pieces of text both tokenizers end at). Starting from a
transferred adapter, its LoRA factors are fitted with Adam so that the target's changes to the
same chunks match the source's: ``min Σ (Δ_t − Δ_s)²`` over the chunks of generated texts, half
sampled from the source with its adapter, half from the two base models (``matched``'s sampler).
A quarter of each half is held out to watch the fit. No task data is read. Writes the fitted
adapter (an ordinary PEFT adapter) to OUT:

    .venv/bin/python bench/dev/distill.py smollm2-135m gemma3-270m \\
        adapters/smollm2-135m-commonsense TRANSFERRED OUT [STEPS] [LR] [lora|steer]

With ``steer`` the transfer stays as it is and one constant per layer, added to the residual
stream, is fitted instead; the development task's mean gold-answer NLL is then printed and the
constants (L, d) saved to OUT. The texts are kept next to OUT (``texts-SOURCE-TARGET.json``), so
that later runs fit the same ones. Both models in float32 on the CPU: about 5 minutes to sample
and score the texts, then 5.6 s a step, for SmolLM2 → Gemma 3 on two cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from effect_map import added  # bench/dev, beside this script
from peft import PeftModel

import crosslora.methods.matched as mm
from crosslora.anchor.probe import align, load_model, right_padded, sample_texts
from crosslora.anchor.vocab import load_tokenizer
from crosslora.eval import evaluate
from crosslora.zoo.models import model_path

DEV = str(Path(__file__).with_name("arc_dev.json"))
N_TEXTS = 128  # 64 from the adapted source, 64 from the base models
BATCH = 4
SEED = mm.SEED + 31


def chunk_ll(model, ids: list[list[int]], pos: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Per text, the log-likelihood of each piece between consecutive aligned positions."""
    x, mask = right_padded(ids, pad)
    logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits.float()
    tok = logits[:, :-1].gather(-1, x[:, 1:, None])[..., 0] - logits[:, :-1].logsumexp(-1)
    cum = torch.cat([tok.new_zeros(len(ids), 1), tok.cumsum(1)], 1)
    return [cum[j, p[1:]] - cum[j, p[:-1]] for j, p in enumerate(map(torch.tensor, pos))]


def lls(model, ids, pos, pad) -> list[torch.Tensor]:
    """``chunk_ll`` over all texts in batches, no gradient."""
    with torch.no_grad():
        return [
            c
            for lo in range(0, len(ids), BATCH)
            for c in chunk_ll(model, ids[lo : lo + BATCH], pos[lo : lo + BATCH], pad)
        ]


def effects(model, ids, pos, pad, base: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Chunk log-likelihood changes of ``model``'s adapter (``base``: the unadapted ones)."""
    if base is None:
        with model.disable_adapter():
            base = lls(model, ids, pos, pad)
    return [a - b for a, b in zip(lls(model, ids, pos, pad), base)]


def score(d_t: list[torch.Tensor], d_s: list[torch.Tensor]) -> str:
    t, s = torch.cat(d_t), torch.cat(d_s)
    explained = 1 - (t - s).pow(2).sum() / s.pow(2).sum()  # unrounded (agreement rounds to 4)
    corr = torch.corrcoef(torch.stack([t, s]))[0, 1]
    return f"mse {(t - s).pow(2).mean():.3f}, corr {corr:.3f}, explained {explained:.3f}"


def main(source, target, adapter, transferred, out, steps="60", lr="2e-4", what="lora") -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    ps, pt = model_path(source, must_exist=True), model_path(target, must_exist=True)
    tok_s, tok_t = load_tokenizer(ps, "source"), load_tokenizer(pt, "target")
    ms, mt = load_model(ps, cpu, "source"), load_model(pt, cpu, "target")
    cache = Path(out).parent / f"texts-{source}-{target}.json"
    if cache.exists():  # an earlier run's texts, so that runs differ only in the fit
        fit, held = json.loads(cache.read_text())
        ms = PeftModel.from_pretrained(ms, adapter)
    else:
        with torch.no_grad():
            base_texts = mm.probe_texts(ms, tok_s, mt, tok_t, N_TEXTS // 2, SEED)
            ms = PeftModel.from_pretrained(ms, adapter)
            tuned = sample_texts(ms, tok_s, N_TEXTS // 2, mm.TEXT_TOKENS, SEED + 2)
        q_t, q_b = 3 * len(tuned) // 4, 3 * len(base_texts) // 4
        fit, held = tuned[:q_t] + base_texts[:q_b], tuned[q_t:] + base_texts[q_b:]
        cache.write_text(json.dumps([fit, held]))
    pad_s = tok_s.pad_token_id or 0
    pad_t = tok_t.pad_token_id or 0
    (fs, ft), (hs, ht) = align(fit, tok_s, tok_t), align(held, tok_s, tok_t)
    ds_fit = effects(ms, fs.ids, fs.positions, pad_s)
    ds_held = effects(ms, hs.ids, hs.positions, pad_s)
    mt = PeftModel.from_pretrained(mt, transferred, is_trainable=True)
    with mt.disable_adapter():
        base_fit = lls(mt, ft.ids, ft.positions, pad_t)
        base_held = lls(mt, ht.ids, ht.positions, pad_t)
    print(f"{len(fit)} fit texts ({sum(map(len, ds_fit))} chunks), {len(held)} held out")
    print("transfer, fit:", score(effects(mt, ft.ids, ft.positions, pad_t, base_fit), ds_fit))
    d_held = effects(mt, ht.ids, ht.positions, pad_t, base_held)
    print("transfer, held out:", score(d_held, ds_held))
    if what == "lora":
        params = [p for n, p in mt.named_parameters() if "lora_" in n]
    else:  # "steer": one constant per layer on top of the transfer, which stays as it is
        mt.requires_grad_(False)
        c = torch.zeros(mt.config.num_hidden_layers, mt.config.hidden_size, requires_grad=True)
        added(mt, c)  # c[l] added to the output of decoder layer l
        params = [c]
    opt = torch.optim.Adam(params, lr=float(lr))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(int(steps)):
        pick = torch.randperm(len(fit), generator=gen)[:BATCH].tolist()
        ids, pos = [ft.ids[j] for j in pick], [ft.positions[j] for j in pick]
        now = chunk_ll(mt, ids, pos, pad_t)
        loss = sum((n - base_fit[j] - ds_fit[j]).pow(2).sum() for n, j in zip(now, pick)) / sum(
            len(ds_fit[j]) for j in pick
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0:
            d_held = effects(mt, ht.ids, ht.positions, pad_t, base_held)
            print(f"step {step + 1} ({time.time() - t0:.0f} s): loss {loss.item():.3f};",
                  "held out:", score(d_held, ds_held), flush=True)  # fmt: skip
    if what == "lora":
        mt.save_pretrained(out)
    else:
        with torch.no_grad():
            (task,) = evaluate(mt, tok_t, DEV, progress=False)["tasks"].values()
        print(f"development NLL {task['metrics']['nll']['value']:.3f}")
        torch.save(c.detach(), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
