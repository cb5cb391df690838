"""The layer-streamed forward (``methods.matched.stream``) against a plain whole-model forward:
on every family of the suite, the hidden states entering each decoder layer and the logits of
a padded chunk of texts agree (float32, the same ops: to 1e-5 relative)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from crosslora.arch.layout import Layout
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.pretrained import load_model
from crosslora.methods.matched.stream import Streamed, Whole, run_layers, runner
from crosslora.padding import right_padded

CONVERTED = {"mixtral", "qwen2_moe", "qwen3_moe"}  # experts fused by transformers at load time


def chunk(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (11, 7, 9)]
    return right_padded(seqs, 0)


def whole_forward(path, layout, ids, mask):
    model = load_model(path, torch.device("cpu"), "model")
    entering: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for layer in model.get_submodule(layout.family.layers)]  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    for h in hooks:
        h.remove()
    return entering, logits


def streamed_forward(run: Streamed, layout, ids, mask):
    entering: list[torch.Tensor] = []

    def around(i, _v, _c):
        layer = run.skeleton.get_submodule(f"{layout.family.layers}.{i}")
        return _PreHook(layer, entering)

    ((last,),) = run_layers(run, [(ids, mask)], around=around)
    return entering, run.logits(ids, mask, last)


class _PreHook:
    def __init__(self, module, out):
        self.module, self.out = module, out

    def __enter__(self):
        self.h = self.module.register_forward_pre_hook(
            lambda _m, args, kwargs: self.out.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )

    def __exit__(self, *exc):
        self.h.remove()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-5


@pytest.mark.parametrize("name", sorted(n for n in TINY if n != "llama-twin"))
def test_streamed_forward_is_the_whole_models(tiny_model, name):
    path = tiny_model(name)
    layout = Layout(Checkpoint(path), "model")
    ids, mask = chunk(layout)
    want_in, want_logits = whole_forward(path, layout, ids, mask)
    run = runner(layout, torch.device("cpu"), "model")
    assert isinstance(run, Whole) == (name in CONVERTED)
    got_in, got_logits = streamed_forward(run, layout, ids, mask)
    assert len(got_in) == len(want_in) == layout.num_layers
    for i, (g, w) in enumerate(zip(got_in, want_in)):
        assert close(g, w), f"layer {i} input"
    real = mask.bool()
    assert close(got_logits[real], want_logits[real])


def test_variants_run_apart(tiny_model):
    """Two variants from the same input: a change inside one (a hook scaling layer 1's output)
    reaches that variant's result only."""
    path = tiny_model("llama")
    layout = Layout(Checkpoint(path), "model")
    run = Streamed(layout, torch.device("cpu"), "model")
    ids, mask = chunk(layout)

    def around(i, v, _c):
        if i == 1 and v == 1:
            layer = run.skeleton.get_submodule(f"{layout.family.layers}.1")
            return _Scale(layer)
        return None

    (a,), (b,) = run_layers(run, [(ids, mask)], variants=2, around=around)
    ((plain,),) = run_layers(run, [(ids, mask)])
    assert torch.equal(a, plain)
    assert not torch.allclose(a, b)


class _Scale:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.h = self.module.register_forward_hook(lambda _m, _a, out: out * 2)

    def __exit__(self, *exc):
        self.h.remove()


def test_a_model_with_several_layer_types(tmp_path):
    """Gemma 3 interleaves sliding and full attention (masks and rotary tables per type): the
    skeleton keeps one layer of each type, and every layer still gets its own type's."""
    import transformers as tf

    from conftest import build_tokenizer

    config = tf.Gemma3TextConfig(vocab_size=96, hidden_size=48, intermediate_size=96,
                                 num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=24, max_position_embeddings=64, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention",
                                              "sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    build_tokenizer("gemma3_text").save_pretrained(tmp_path)
    layout = Layout(Checkpoint(tmp_path), "model")
    ids, mask = chunk(layout)
    want_in, want_logits = whole_forward(tmp_path, layout, ids, mask)
    got_in, got_logits = streamed_forward(runner(layout, torch.device("cpu"), "model"), layout,
                                          ids, mask)  # fmt: skip
    for g, w in zip(got_in, want_in):
        assert close(g, w)
    assert close(got_logits[mask.bool()], want_logits[mask.bool()])


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "gpt2"])
def test_sampling_one_layer_at_a_time_writes_the_whole_models_texts(tiny_model, name):
    """``Sampler`` (for a model larger than the memory) samples the texts the whole model does:
    the same numbers, one layer at a time, the key/value cache filled layer by layer."""
    from conftest import build_tokenizer
    from crosslora.methods.matched.probe import sample_texts
    from crosslora.methods.matched.stream import Sampler

    path = tiny_model(name)
    layout = Layout(Checkpoint(path), "model")
    tok = build_tokenizer(name)
    whole = sample_texts(load_model(path, torch.device("cpu"), "model"), tok, 3, 12, seed=5)
    run = Streamed(layout, torch.device("cpu"), "model")
    assert sample_texts(Sampler(run), tok, 3, 12, seed=5) == whole
    assert len(whole) == 3


@pytest.mark.parametrize("pair", [("llama", "gemma3_text"), ("mistral", "phi3"), ("gpt2", "gpt_neox"),
                                  ("olmo2", "granite"), ("gemma3", "llama-deep"),
                                  ("phi4", "mistral-nemo")])  # fmt: skip
def test_a_streamed_transfer_writes_the_whole_models_adapter(tiny_model, tiny_adapter, tmp_path,
                                                             monkeypatch, pair):  # fmt: skip
    """End to end, per family pair: ``matched`` with every model read one layer at a time writes
    the adapter it writes with the models held whole (``Whole``), tensor for tensor."""
    from safetensors.torch import load_file

    import crosslora.methods.matched as matched
    from crosslora.methods.matched import MatchedParams
    from crosslora.pipeline import TransferOptions, transfer

    src, tgt = pair
    options = TransferOptions(params=MatchedParams(n_texts=8, calibration_texts=4, text_tokens=24,
                                                   min_positions=16), cache=False)  # fmt: skip
    args = (str(tiny_adapter(src)), str(tiny_model(src)), str(tiny_model(tgt)))
    transfer(*args, tmp_path / "streamed", options, progress=False)
    held = []
    monkeypatch.setattr(matched, "runner",
                        lambda layout, device, what: held.append(what) or Whole(layout, device, what))
    transfer(*args, tmp_path / "whole", options, progress=False)
    assert len(held) == 4  # the probe's reading and the calibration, each model whole
    a = load_file(tmp_path / "streamed" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
