"""Reading adapters and base models: PEFT config fields, pickle, refusals, sharded and hub
checkpoints, unknown architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    build_model,
    copy_folder,
    delta_weights,
    hub_cache,
    load_with_adapter,
    make_adapter,
    pickle_adapter,
    transfer_argv,
)
from crosslora.cli import main
from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.peft_adapter import read_adapter


def run(*argv: str) -> int:
    """``crosslora transfer ...`` (``argv`` from ``transfer_argv``), quietly: its exit code."""
    return main([*argv, "-q"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
             alpha_pattern={"v_proj": 3.0}),
        dict(use_rslora=True, rank_pattern={"k_proj": 2}),
        dict(target_modules=r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.up_proj)"),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    ],
    ids=["rank-alpha-pattern", "rslora", "regex-targets", "layers-to-transform"],
)  # fmt: skip
def test_peft_config_fields_are_honoured(lora_kwargs, tiny_model, tmp_path):
    """Copy onto the same model reproduces what PEFT applies, for each config feature: exactly,
    or to float rounding where the source's rank/alpha patterns are folded into one rank and
    scale (written adapters carry no patterns: tests/test_serving_format.py)."""
    model = tiny_model("llama")
    adapter = make_adapter(model, tmp_path / "ad", **lora_kwargs)
    out = tmp_path / "out"
    assert run(*transfer_argv(adapter, model, model, out)) == 0
    want = delta_weights(load_with_adapter(model, adapter))
    got = delta_weights(load_with_adapter(model, out))
    assert want.keys() == got.keys()
    folded = "rank_pattern" in lora_kwargs or "alpha_pattern" in lora_kwargs
    for name in want:
        if folded:
            assert rel_err(got[name], want[name]) < 1e-6, name
        else:
            assert torch.equal(got[name], want[name]), name
    # and a transfer to another family keeps each module's scale (here: full-rank cross-lora
    # onto a copy of the same model, which must reproduce ΔW)
    out2, same = tmp_path / "out2", copy_folder(model, tmp_path / "same")
    assert (
        run(*transfer_argv(adapter, model, same, out2, "cross-lora"), "--truncation-rank", "full")
        == 0
    )
    got2 = delta_weights(load_with_adapter(model, out2))
    for name in want:
        assert rel_err(got2[name], want[name]) < 1e-5, name


def test_fan_in_fan_out_adapter_on_conv1d(tiny_model, tiny_adapter):
    adapter = read_adapter(tiny_adapter("gpt2"))
    assert adapter.config["fan_in_fan_out"] is True
    m = adapter.modules["transformer.h.0.attn.c_attn"]
    assert m.shape == (96, 32) and m.r == 4  # (out, in) whatever Conv1D's storage


def test_pickle_adapter_needs_the_flag(tiny_model, tiny_adapter, tmp_path, capsys):
    model = tiny_model("llama")
    src = tiny_adapter("llama")
    pickled = pickle_adapter(src, tmp_path / "pickled")
    capsys.readouterr()
    assert run(*transfer_argv(pickled, model, model, tmp_path / "o1")) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    assert run(*transfer_argv(pickled, model, model, tmp_path / "o2"), "--allow-pickle") == 0
    a, b = (
        load_file(src / "adapter_model.safetensors"),
        load_file(tmp_path / "o2/adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_with_code_is_refused_even_with_the_flag(tiny_model, tiny_adapter, tmp_path, capsys):
    """weights_only=True: a pickle that would run code does not load."""
    model = tiny_model("llama")
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = pickle_adapter(tiny_adapter("llama"), tmp_path / "evil", {"x": Boom()})
    capsys.readouterr()
    assert run(*transfer_argv(evil, model, model, tmp_path / "o"), "--allow-pickle") == 2
    assert not marker.exists()
    assert "cannot load" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config_edit", "tensors_edit", "message"),
    [
        (lambda c: c.update(peft_type="LOHA"), None, "peft_type 'LOHA' is not supported"),
        (lambda c: c.update(use_dora=True), None, "DoRA adapters"),
        (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                   torch.ones(32)}), "DoRA magnitude"),
        (None, lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 96)}),
         "embedding LoRA"),
        (lambda c: c.update(r="8"), None, "field 'r' has the wrong type"),
        (lambda c: c.update(rank_pattern={"q_proj": 8}), None, "has rank 4 but the config says r=8"),
        (lambda c: c.update(target_modules=["nothing_here"]), None, "is not in target_modules"),
    ],
    ids=["loha", "dora-config", "dora-tensor", "embedding", "wrong-type", "rank-mismatch", "targets"],
)  # fmt: skip
def test_unsupported_adapters_are_refused_in_one_line(config_edit, tensors_edit, message, tiny_model,
                                                      tiny_adapter, tmp_path, capsys):  # fmt: skip
    model = tiny_model("llama")
    bad = copy_folder(tiny_adapter("llama"), tmp_path / "bad", config_edit, tensors_edit)
    capsys.readouterr()
    assert run(*transfer_argv(bad, model, model, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crosslora: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_modules_to_save_are_dropped_with_a_warning(tiny_model, tiny_adapter, tmp_path, capsys):
    model = tiny_model("llama")
    bad = copy_folder(
        tiny_adapter("llama"), tmp_path / "mts",
        lambda c: c.update(modules_to_save=["lm_head"]),
        lambda t: t.update({"base_model.model.lm_head.modules_to_save.weight": torch.ones(96, 32)}),
    )  # fmt: skip
    capsys.readouterr()
    assert main(transfer_argv(bad, model, model, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "dropping 1 adapter tensor(s)" in err and "modules_to_save=['lm_head']" in err
    assert "lm_head" not in "".join(load_file(tmp_path / "out/adapter_model.safetensors"))


def test_sharded_checkpoint_is_read_lazily_and_gives_the_same_result(
    tiny_model, tiny_adapter, tmp_path
):
    single = tiny_model("qwen2")
    sharded = tmp_path / "sharded"
    model = build_model("qwen2")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 3
    ckpt = Checkpoint(sharded)
    assert ckpt.keys() and all(k in ckpt for k in Checkpoint(single).keys())
    argv = transfer_argv(
        tiny_adapter("llama"), tiny_model("llama"), sharded, tmp_path / "a", "cross-lora"
    )
    assert run(*argv) == 0
    argv = transfer_argv(
        tiny_adapter("llama"), tiny_model("llama"), single, tmp_path / "b", "cross-lora"
    )
    assert run(*argv) == 0
    a, b = (
        load_file(tmp_path / "a/adapter_model.safetensors"),
        load_file(tmp_path / "b/adapter_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hub_ids_resolve_from_the_local_hub_cache_offline(
    tiny_model, tiny_adapter, tmp_path, monkeypatch
):
    """A hub id works with no network when the hub cache has it (HF_HUB_OFFLINE=1)."""
    hub_cache(tmp_path, monkeypatch,
              {"acme/tiny-llama": tiny_model("llama"), "acme/tiny-qwen2": tiny_model("qwen2")})  # fmt: skip
    out = tmp_path / "out"
    assert (
        run(
            *transfer_argv(
                tiny_adapter("llama"), "acme/tiny-llama", "acme/tiny-qwen2", out, "crop-pad"
            )
        )
        == 0
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/tiny-qwen2"
    with pytest.raises(CrossLoraError, match="not a local folder, and not available from the hub"):
        Checkpoint("acme/not-cached")


def test_unknown_model_type_lists_what_is_supported(tiny_model, tiny_adapter, tmp_path, capsys):
    odd = copy_folder(tiny_model("llama"), tmp_path / "odd", lambda c: c.update(model_type="mamba"))
    capsys.readouterr()
    assert run(*transfer_argv(tiny_adapter("llama"), tiny_model("llama"), odd, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert (
        "model_type 'mamba' is not supported; supported: gemma, gemma2, gemma3, gemma3_text, "
        "gpt2, gpt_neox, granite, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen2_moe, qwen3, "
        "qwen3_moe\n"
    ) in err


def test_adapter_for_another_model_names_the_first_module_that_disagrees(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    capsys.readouterr()
    argv = transfer_argv(
        tiny_adapter("llama"), tiny_model("qwen2"), tiny_model("llama"), tmp_path / "o"
    )
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["crosslora: error: adapter does not fit the source model: model.layers.0.mlp.down_proj "
                   "has ΔW shape (32, 64), the source weight is (40, 72)"]  # fmt: skip
