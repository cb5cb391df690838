"""A written adapter works anywhere: servers that ignore ``rank_pattern`` / ``alpha_pattern``
(vLLM, LoRAX, SGLang) apply it as PEFT does; it names its base model by a hub id that resolves
wherever it goes; its model card is front matter the Hub accepts, the command that made it, the
method's measured expectation and the licences."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (
    TOKENS,
    copy_folder,
    delta_weights,
    hub_cache,
    load_with_adapter,
    make_adapter,
    transfer_argv,
)
from crosslora.cli import build_parser, main
from crosslora.io.peft_adapter import (
    PULLED_MARKER,
    PULLED_MODELS,
    base_model_name,
    read_adapter,
    serving_factors,
    write_adapter,
)
from crosslora.lora import LoraFactors
from crosslora.methods import expectation

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
PREFIX = "base_model.model."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def global_reading(out: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as vLLM reads the files: every module scaled by the global ``lora_alpha / r``
    (``/ sqrt(r)`` with rsLoRA), whatever pattern keys the config has."""
    config = json.loads((out / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(out / "adapter_model.safetensors")
    deltas = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            B = tensors[f"{PREFIX}{module}.lora_B.weight"]
            deltas[module] = scale * (B.double() @ A.double())
    return deltas


def assert_serves_alike(out: Path, model_dir: Path, intended: dict[str, LoraFactors]) -> None:
    """PEFT's ΔW, the global-scale reading's and the intended factors' agree for every module;
    the config has no pattern and every stored factor has the config's rank."""
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern"), config
    assert config["r"] == max(f.r for f in intended.values())
    for key, t in load_file(out / "adapter_model.safetensors").items():
        assert t.shape[0 if ".lora_A." in key else 1] == config["r"], (key, tuple(t.shape))
    peft = delta_weights(load_with_adapter(model_dir, out))
    read = global_reading(out)
    assert peft.keys() == read.keys() == intended.keys()
    for module, f in intended.items():
        want = f.to("cpu", torch.float64).delta()
        assert rel_err(peft[module], want) < 1e-5, ("PEFT", module)
        assert rel_err(read[module], want) < 1e-5, ("global-scale reading", module)


# --- 1. one rank, every scale folded into B ----------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_write_adapter_pads_ranks_and_folds_scales(use_rslora, tiny_model, tmp_path):
    """Hand-made factors of four ranks and four scales, none of them the global ones."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    spec = {  # module: ((out, in), rank, scale)
        "model.layers.0.self_attn.q_proj": ((32, 32), 2, 0.5),
        "model.layers.0.self_attn.k_proj": ((16, 32), 4, 2.0),
        "model.layers.1.self_attn.v_proj": ((16, 32), 6, 3.7),
        "model.layers.1.mlp.down_proj": ((32, 64), 3, 1.25),
    }
    intended = {
        m: LoraFactors(torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen), s)
        for m, ((o, i), r, s) in spec.items()
    }
    out = tmp_path / "out"
    out.mkdir()
    regex = "^(?:" + "|".join(re.escape(m) for m in sorted(intended)) + ")$"
    config = write_adapter(
        out, ((m, f) for m, f in intended.items()),  # a generator, as the pipeline passes
        base_model=str(model), lora_alpha=8.0, use_rslora=use_rslora,
        selection={"target_modules": regex}, layers_pattern="layers", fan_in_fan_out=False,
        dtype=torch.float32, metadata={}, extra={"task_type": "CAUSAL_LM"},
    )  # fmt: skip
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 8.0, use_rslora)
    # the factors parked while the rank was found leave nothing behind
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]  # fmt: skip
    assert_serves_alike(out, model, intended)


def test_factors_already_at_the_rank_and_scale_are_written_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    f = LoraFactors(torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen), 2.0)
    A, B = serving_factors(f, 4, 2.0)
    assert A is f.A and B is f.B
    A, B = serving_factors(f, 7, 0.5)
    assert A.shape == (7, 8) and B.shape == (6, 7)
    assert not A[4:].any() and not B[:, 4:].any()
    assert torch.allclose(0.5 * B @ A, f.delta(), rtol=1e-6, atol=1e-6)


@pytest.fixture
def captured(monkeypatch):
    """The factors the pipeline hands to ``write_adapter``, per module: what it means to write."""
    import crosslora.pipeline as pipeline

    seen: dict[str, LoraFactors] = {}
    real = pipeline.write_adapter

    def spy(folder, modules, **kwargs):
        def record():
            for module, f in modules:
                seen[module] = LoraFactors(f.A.clone(), f.B.clone(), f.scale)
                yield module, f

        return real(folder, record(), **kwargs)

    monkeypatch.setattr(pipeline, "write_adapter", spy)
    return seen


PATTERNS = dict(rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                alpha_pattern={"v_proj": 3.0})  # fmt: skip
CASES = {
    # fused qkv_proj / gate_up_proj join roles with different A: ranks 12 and 8 beside 4
    "fused-phi3": ("llama", "phi3", "cross-lora", {}, ()),
    # and the source's own patterns: every module's scale differs from the global one
    "fused-phi3-patterns": ("llama", "phi3", "cross-lora", PATTERNS, ()),
    "fused-phi3-rslora": ("llama", "phi3", "cross-lora",
                          dict(use_rslora=True, rank_pattern={"k_proj": 2}), ()),
    # Conv1D (fan_in_fan_out) with a fused c_attn
    "fused-gpt2-patterns": ("llama", "gpt2", "crop-pad", PATTERNS, ()),
    # merge: two source layers meet in one target layer, re-factorised at the larger rank
    "merge": ("llama-deep", "llama", "crop-pad",
              dict(rank_pattern={"model.layers.1.self_attn.q_proj": 6},
                   alpha_pattern={"model.layers.0.self_attn.v_proj": 3.0}),
              ("--layer-map", "merge")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_real_transfers_serve_alike_without_patterns(case, captured, tiny_model, tmp_path):
    src, tgt, method, lora_kwargs, extra = CASES[case]
    adapter = make_adapter(tiny_model(src), tmp_path / "ad", **lora_kwargs)
    out = tmp_path / "out"
    argv = transfer_argv(adapter, tiny_model(src), tiny_model(tgt), out, method, "-q", *extra)
    assert main(argv) == 0
    assert len({f.r for f in captured.values()}) > 1  # the case exercises what it is for
    if "alpha_pattern" in lora_kwargs:  # and scales that differ between modules
        assert len({f.scale for f in captured.values()}) > 1
    assert_serves_alike(out, tiny_model(tgt), captured)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["written"]["r"] == max(f.r for f in captured.values())


# --- 2. the base model's name resolves wherever the adapter goes ------------------------------


def test_base_model_name_prefers_a_hub_id(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert base_model_name("acme/tiny", tmp_path / "snapshot", {}) == "acme/tiny"  # (i)
    assert base_model_name(str(folder), folder, {"_name_or_path": "acme/x"}) == "acme/x"  # (ii)
    for not_hub in ("/home/u/ckpt", "./out/x", "~/m/x", "a/b/c", "ckpt", "../x"):
        assert base_model_name(str(folder), folder, {"_name_or_path": not_hub}) == "my-model"
    (folder / PULLED_MARKER).write_text(json.dumps({"name": "gemma3-270m"}))  # (iii)
    assert base_model_name(str(folder), folder, {}) == "google/gemma-3-270m"
    (folder / PULLED_MARKER).write_text(json.dumps({"name": "x", "upstream": "acme/up"}))
    assert base_model_name(str(folder), folder, {}) == "acme/up"
    snap = tmp_path / "hub" / "models--acme--cached" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    assert base_model_name(str(snap), snap, {}) == "acme/cached"  # a hub cache's snapshot
    bare = tmp_path / "bare"
    bare.mkdir()
    assert base_model_name(str(bare) + "/", bare, {"_name_or_path": "x"}) == "bare"  # (iv)


def test_pulled_models_are_the_zoo_models():
    from crosslora.zoo.models import MARKER
    from crosslora.zoo.registry import REGISTRY

    assert PULLED_MARKER == MARKER
    assert PULLED_MODELS.keys() == REGISTRY.keys()
    for name, (hub_id, _) in PULLED_MODELS.items():  # the description names the upstream model
        described = REGISTRY[name].description.lower().replace(" ", "-")
        assert described.startswith(hub_id.split("/")[1].lower()), (name, hub_id)


@pytest.mark.parametrize("folder", sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir()))
def test_shipped_adapters_name_their_upstream_models(folder):
    zoo_name = folder.removesuffix("-commonsense")
    hub_id, licence = PULLED_MODELS[zoo_name]
    config = json.loads((ADAPTERS / folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == hub_id
    card = (ADAPTERS / folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == hub_id and meta["library_name"] == "peft"
    assert meta["license"] == licence
    read_adapter(ADAPTERS / folder)  # still a valid adapter


def test_option_sets_the_base_model(tiny_model, tiny_adapter, tmp_path):
    out = tmp_path / "out"
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2"), out,
                         "crop-pad", "-q", "--base-model-name-or-path", "acme/named")  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "acme/named"
    )
    assert card_meta(out)["base_model"] == "acme/named"
    assert "--base-model-name-or-path acme/named" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("how", "hub_id"),
    [("pulled", PULLED_MODELS["smollm2-135m"][0]), ("config", "acme/tiny-llama")],
)
def test_output_loads_with_auto_peft_model_anywhere(how, hub_id, tiny_model, tiny_adapter,
                                                     tmp_path, monkeypatch):  # fmt: skip
    """The target is a local folder (pulled by the zoo, or whose config names its hub id); the
    output loads by that hub id from a hub cache after the folder is gone."""
    from peft import AutoPeftModelForCausalLM

    model = tiny_model("llama")
    edit = (lambda c: c.update(_name_or_path=hub_id)) if how == "config" else None
    target = copy_folder(model, tmp_path / "made-here" / "smollm2-135m", edit)
    if how == "pulled":
        (target / PULLED_MARKER).write_text(json.dumps({"name": "smollm2-135m"}))
    out = tmp_path / "out"
    argv = transfer_argv(tiny_adapter("llama"), model, target, out, "copy", "-q")
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        hub_id
    )
    assert card_meta(out)["base_model"] == hub_id
    shutil.rmtree(tmp_path / "made-here")
    hub_cache(tmp_path, monkeypatch, {hub_id: model})
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    want = load_with_adapter(model, out)
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS).logits, want(TOKENS).logits, atol=1e-5)


# --- 3. the model card ------------------------------------------------------------------------


def card_meta(out: Path) -> dict:
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta


def with_card(folder: Path, dst: Path, licence: str) -> Path:
    copy = copy_folder(folder, dst)
    (copy / "README.md").write_text(f"---\nlicense: {licence}\ntags: [x]\n---\n\n# a card\n")
    return copy


@pytest.mark.parametrize("where", ["adapter", "target", "nowhere"])
def test_model_card_front_matter_and_licence(where, tiny_model, tiny_adapter, tmp_path):
    adapter, target = tiny_adapter("llama"), tiny_model("qwen2")
    if where == "adapter":
        adapter = with_card(adapter, tmp_path / "adapter", "apache-2.0")
        target = with_card(target, tmp_path / "target", "mit")  # the adapter's licence wins
    if where == "target":
        target = with_card(target, tmp_path / "target", "mit")
    out = tmp_path / "out"
    assert main(transfer_argv(adapter, tiny_model("llama"), target, out, "crop-pad", "-q")) == 0
    meta = card_meta(out)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == Path(target).name  # a local folder with no hub id: its name
    assert {"crosslora", "lora", "peft"} <= set(meta["tags"])
    assert meta.get("license") == {"adapter": "apache-2.0", "target": "mit"}.get(where)
    card = (out / "README.md").read_text()
    if where == "adapter":
        assert "- source adapter (`" in card and "): apache-2.0" in card
        assert "- target model (`" in card and "): mit" in card


def test_model_card_has_the_command_and_the_expectation(tiny_model, tiny_adapter, tmp_path):
    src, tgt, adapter = tiny_model("llama"), tiny_model("qwen2"), tiny_adapter("llama")
    out = tmp_path / "first"
    extra = ("-q", "--truncation-rank", "8", "--svd", "exact", "--no-cache", "--dtype", "float32")
    assert main(transfer_argv(adapter, src, tgt, out, "cross-lora", *extra)) == 0
    card = (out / "README.md").read_text()
    report = json.loads((out / "transfer_report.json").read_text())
    command = report["command"]
    assert f"```bash\n{command}\n```" in card
    said, warn = expectation("cross-lora")
    assert warn and f"**Warning:** {said[0].upper()}{said[1:]}." in card
    # the command parses as the options that ran, and makes the same adapter again
    argv = shlex.split(command)
    assert argv[:2] == ["crosslora", "transfer"]
    args = build_parser().parse_args(argv[1:])
    assert (args.adapter, args.source_model, args.target_model, args.out_path) == (
        [str(adapter)],
        str(src),
        str(tgt),
        out,
    )
    assert (args.method, args.layer_map, args.truncation_rank, args.svd) == (
        "cross-lora",
        "index",
        8,
        "exact",
    )
    assert (args.no_cache, args.dtype, args.device) == (True, "float32", "cpu")
    again = tmp_path / "again"
    assert main([str(again) if a == str(out) else a for a in argv[1:]] + ["-q"]) == 0
    first = load_file(out / "adapter_model.safetensors")
    second = load_file(again / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
