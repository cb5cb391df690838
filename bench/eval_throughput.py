"""Items per second of crosslora's batched scorer against one-choice-at-a-time scoring.

Both score the same items of one task with the same tokens, in the same run:

- ``naive``: one forward pass per (item, choice) over ``context + continuation``, batch 1;
- ``flat``: right-padded batches of (context + choice) rows, sorted by length;
- ``shared``/``auto``: each context run once, its KV cache reused for every choice.

Each method first scores two items untimed (warm-up); then ``--repeats`` rounds each run every
method once over all items, interleaved so that they share whatever else loads the machine;
a method's best time counts. The
script also checks that every method gives the naive log-likelihoods (max abs difference).

    python bench/eval_throughput.py                                # a pico Llama built here
    python bench/eval_throughput.py --model ~/.cache/crosslora/models/smollm2-135m --limit 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from crosslora.device import resolve_device  # noqa: E402
from crosslora.eval.scoring import Encoder, model_max_length, score_items  # noqa: E402
from crosslora.eval.tasks import TASKS, load_items  # noqa: E402


@torch.inference_mode()
def score_naive(model, tokenizer, items, device) -> list[list[float]]:
    """One forward pass per (item, choice): the baseline."""
    encoder = Encoder(tokenizer, None, model_max_length(model, tokenizer))
    out = []
    for item in items:
        row = []
        for context, continuation in zip(item.contexts, item.continuations, strict=True):
            ctx, cont = encoder.encode_pair(context, continuation)
            ctx = encoder.truncate(ctx, cont)
            ids = torch.tensor([ctx + cont[:-1]], device=device)
            logprobs = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
            row.append(float(logprobs[pos, torch.tensor(cont, device=device)].sum()))
        out.append(row)
    return out


def pico_model(folder: Path) -> Path:
    """A random Llama (hidden 256, 4 layers, vocab 4k) with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = []
    for name in ("arc_easy", "hellaswag", "boolq"):
        for item in load_items(TASKS[name], "validation", limit=300)[0]:
            text += [c + x for c, x in zip(item.contexts, item.continuations, strict=True)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=4000,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: a pico Llama)")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--strategies", default="flat,shared,auto", help="batched ones to time")
    # "shared" refuses items whose context is a single token (nothing to cache).
    parser.add_argument("--output", type=Path, help="write the measurements as JSON")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(args.device)
    folder = args.model or pico_model(Path(tempfile.mkdtemp(prefix="pico-llama-")))
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    items, _ = load_items(TASKS[args.task], "validation", args.limit)
    n_requests = sum(i.n_choices for i in items)
    print(f"{folder} on {device} ({args.dtype}, {torch.get_num_threads()} threads): "
          f"{args.task} validation, {len(items)} items, {n_requests} requests")  # fmt: skip

    def method(name):
        if name == "naive":
            return lambda subset: score_naive(model, tokenizer, subset, device)

        def run(subset):
            scores = score_items(model, tokenizer, subset, batch_size=args.batch_size,
                                 device=device, strategy=name, progress=False)  # fmt: skip
            return [[s.loglik for s in row] for row in scores]

        return run

    names = ["naive", *args.strategies.split(",")]
    for name in names:  # warm-up, untimed
        method(name)(items[:2])
    seconds = {name: float("inf") for name in names}
    logliks = {}
    for _ in range(args.repeats):  # rounds interleave the methods, so they share the load
        for name in names:
            start = time.perf_counter()
            logliks[name] = method(name)(items)
            seconds[name] = min(seconds[name], time.perf_counter() - start)

    rows = {}
    for name in names:
        diff = max(
            abs(a - b)
            for row, ref in zip(logliks[name], logliks["naive"], strict=True)
            for a, b in zip(row, ref, strict=True)
        )
        rows[name] = {
            "seconds": seconds[name],
            "items_per_second": len(items) / seconds[name],
            "speedup_vs_naive": seconds["naive"] / seconds[name],
            "max_abs_loglik_diff_vs_naive": diff,
        }
        row = rows[name]
        print(f"  {name:7s} {row['seconds']:7.2f} s  {row['items_per_second']:8.2f} items/s  "
              f"x{row['speedup_vs_naive']:5.2f} vs naive  max |dloglik| {diff:.1e}")  # fmt: skip
    if args.output:
        meta = {"model": str(folder), "device": str(device), "dtype": args.dtype,
                "task": args.task, "items": len(items), "requests": n_requests,
                "batch_size": args.batch_size, "threads": torch.get_num_threads()}  # fmt: skip
        args.output.write_text(json.dumps({**meta, "methods": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
