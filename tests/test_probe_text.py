"""The matched method's probe text: kept only where both models read it as text."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, build_tokenizer, word
from crosslora.methods.matched import probe
from crosslora.methods.matched.probe import readable, sample_texts


def char_tokenizer():
    """A tokenizer that spells every word letter by letter, as a byte-level vocabulary spells a
    script it lacks."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = {c: i + 4 for i, c in enumerate("abcdefghijwx")}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3} | letters
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Split(Regex("."), behavior="isolated"),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


def prose(n: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(word(int(i)) for i in torch.randint(0, 93, (n,), generator=gen))


def test_text_both_models_read_as_words_is_readable():
    words = build_tokenizer("llama")
    assert readable(prose(96), words, words)
    assert readable(prose(96), words, build_tokenizer("qwen2"))  # another word vocabulary


def test_text_one_tokenizer_spells_in_pieces_is_not_readable():
    """Letter by letter, a word of 3-5 letters is 4-6 tokens per aligned position (the word's
    end), far above ``MAX_PIECES``, whichever side spells it."""
    words, letters = build_tokenizer("llama"), char_tokenizer()
    assert not readable(prose(96), words, letters)
    assert not readable(prose(96), letters, words)


@pytest.mark.parametrize("period", [1, 2, 5])
def test_a_loop_is_not_readable(period):
    words = build_tokenizer("llama")
    loop = " ".join([prose(period, seed=1)] * (96 // period))
    assert not readable(loop, words, words)


def test_a_short_repeat_is_still_readable():
    """A text that repeats itself for less than ``MAX_REPEATED`` of its length is still prose."""
    words = build_tokenizer("llama")
    once = prose(80) + " " + prose(16, seed=1)
    assert readable(once + " " + prose(16, seed=1), words, words)


@pytest.fixture(scope="module")
def sampler():
    model = build_model("llama").eval()
    return model, build_tokenizer("llama")


def test_sampling_keeps_what_keep_accepts_and_samples_on(sampler):
    """With ``keep`` the texts are those of plain sampling that it accepts, then new ones until
    ``n`` are kept: the first ``n`` sampled do not depend on ``keep``."""
    model, tok = sampler
    plain = sample_texts(model, tok, 6, 12, seed=5)
    assert len(plain) == 6
    dropped = {plain[0], plain[3]}
    kept = sample_texts(model, tok, 6, 12, seed=5, keep=lambda t: t not in dropped)
    assert len(kept) == 6
    assert kept[:4] == [t for t in plain if t not in dropped]
    assert not dropped & set(kept)


def test_sampling_gives_up_after_tries_times_the_texts(sampler):
    model, tok = sampler
    seen = []
    assert sample_texts(model, tok, 4, 8, seed=0, keep=lambda t: seen.append(t) and False) == []
    assert len(seen) == probe.TRIES * 4
