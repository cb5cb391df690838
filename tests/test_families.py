"""The families users port between: OLMo 2, Granite, Mistral-Nemo-style attention (``head_dim`` not
``hidden / heads``), Phi-4 (the phi3 architecture), Gemma 3 multimodal checkpoints
(``Gemma3ForConditionalGeneration``: the text decoder under ``language_model``) and the
mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE (attention transferred, experts skipped with a
reason). Each plans (as source and as target, paired with llama), transfers with ``cross-lora``
(both ways) and ``matched`` (once), and the output loads in PEFT on the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_folder, delta_weights, load_with_adapter, make_adapter, transfer_argv
from crosslora.arch.layout import Layout
from crosslora.cli import main
from crosslora.io.checkpoint import Checkpoint

FAMILIES = ["olmo2", "granite", "mistral-nemo", "phi4", "gemma3", "mixtral", "qwen2_moe",
            "qwen3_moe"]  # fmt: skip
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
MOE_MLP = "mixture-of-experts MLP: not transferred"
VISION = "vision tower: not transferred"

# per family, lines its plan must hold when it is the source (paired with llama)
SOURCE_LINES = {
    # Mistral-Nemo: 4 heads × head_dim 12 = 48 query rows from a hidden size of 32
    "mistral-nemo": ["model.layers.0.self_attn.q_proj (48x32) -> model.layers.0.self_attn.q_proj "
                     "(32x32)", "model.layers.0.self_attn.o_proj (32x48)"],
    # Phi-4: grouped-query attention 4:1 in the fused qkv_proj (head_dim 16)
    "phi4": ["model.layers.0.self_attn.qkv_proj[q] (64x64)",
             "model.layers.0.self_attn.qkv_proj[k] (16x64)",
             "model.layers.0.self_attn.qkv_proj[v] (16x64)"],
    # Gemma 3: the decoder's modules by their module paths; the vision tower's q/k/v skipped
    "gemma3": ["model.language_model.layers.1.mlp.down_proj (48x96)",
               f"skip model.vision_tower.encoder.layers.0.self_attn.q_proj: {VISION}"],
    "olmo2": ["model.layers.1.mlp.down_proj (32x64)"],
    "granite": ["source layers dropped: 2"],
}  # fmt: skip


def run(adapter, src, tgt, out, method, *extra) -> Path:
    assert main(transfer_argv(adapter, src, tgt, out, method, "-q", *extra)) == 0
    return Path(out)


def plan(capsys, adapter, src, tgt, out, method="cross-lora", code=0) -> str:
    assert main(transfer_argv(adapter, src, tgt, out, method, "--dry-run")) == code
    assert not Path(out).exists()
    captured = capsys.readouterr()
    return captured.out if code == 0 else captured.err


def written_modules(out: Path) -> set[str]:
    keys = load_file(out / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}


def check_loads(target: Path, out: Path) -> dict[str, torch.Tensor]:
    """The written adapter loads in PEFT on ``target``: exactly its modules get a LoRA (none in a
    vision tower), each with a finite ΔW, nonzero but where the report says that the method's
    calibration sized the role to zero (``matched``: by its effect on the probe text); returns
    the ΔWs."""
    deltas = delta_weights(load_with_adapter(target, out))
    assert set(deltas) == written_modules(out)
    report = json.loads((out / "transfer_report.json").read_text())
    zeroed = {
        m["target_key"] for m in report["modules"] if m["diagnostics"].get("calibration") == 0
    }
    for name, delta in deltas.items():
        assert torch.isfinite(delta).all(), name
        assert (delta.abs().max() > 0) != (name in zeroed), name
    assert len(zeroed) < len(deltas)
    return deltas


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["source", "target"])
def test_dry_run_plans_the_family_paired_with_llama(
    family, side, tiny_model, tiny_adapter, tmp_path, capsys
):
    src, tgt = (family, "llama") if side == "source" else ("llama", family)
    text = plan(capsys, tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out")
    assert "modules: 0 to transfer" not in text
    for line in SOURCE_LINES.get(family, []) if side == "source" else []:
        assert line in text
    if family in MOE:  # q, k, v and o of two layers
        assert "modules: 8 to transfer" in text
        if side == "source":  # an adapter on attention only: nothing skipped
            assert "0 skipped" in text
        else:  # llama's MLP modules: the target has none to receive them
            assert f"skip model.layers.0.mlp.gate_proj: {MOE_MLP}" in text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["source", "target"])
def test_cross_lora_output_loads_in_peft_with_a_nonzero_update(
    family, side, tiny_model, tiny_adapter, tmp_path
):
    src, tgt = (family, "llama") if side == "source" else ("llama", family)
    out = run(tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out", "cross-lora")
    check_loads(tiny_model(tgt), out)
    report = json.loads((out / "transfer_report.json").read_text())
    reasons = {s["reason"] for s in report["skipped"]}
    if side == "source" and family == "gemma3":
        assert reasons == {f"{VISION} (crosslora maps the text decoder only)"}
    elif side == "target" and family in MOE:
        assert {r.split(" (")[0] for r in reasons} == {MOE_MLP}
    elif side == "source" and family == "granite":  # its third layer has no llama layer
        assert reasons == {"source layer 2 has no target layer (index map)"}
    else:
        assert reasons == set()


# matched: one transfer per family; the family is the source for some, the target for others
MATCHED = [("olmo2", "llama"), ("llama", "granite"), ("mistral-nemo", "llama"), ("llama", "phi4"),
           ("llama", "gemma3"), ("mixtral", "llama"), ("llama", "qwen2_moe"),
           ("qwen3_moe", "llama")]  # fmt: skip


@pytest.mark.parametrize(("src", "tgt"), MATCHED)
def test_matched_output_loads_in_peft_with_a_nonzero_update(
    src, tgt, tiny_model, tiny_adapter, tmp_path
):
    out = run(tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out", "matched",
              "--layer-map", "depth")  # fmt: skip
    deltas = check_loads(tiny_model(tgt), out)
    # two layers of the target's modules: q, k, v and o only beside a mixture of experts; Phi-4's
    # fused qkv_proj, o_proj, gate_up_proj and down_proj
    per_layer = 4 if tgt in MOE or src in MOE or tgt == "phi4" else 7
    assert len(deltas) == 2 * per_layer


def test_gemma3_checkpoint_in_either_layout(tiny_model):
    """transformers (5.x) saves the text decoder of ``Gemma3ForConditionalGeneration`` as
    ``language_model.model.*`` (the hub's layout), though its modules are
    ``model.language_model.*``: the layout names modules by their paths and finds their
    weights, with the sizes from ``text_config``."""
    saved = tiny_model("gemma3")
    keys = Checkpoint(saved).keys()
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("model.language_model.") for k in keys)
    layout = Layout(Checkpoint(saved), "model")
    assert (layout.dims.hidden, layout.dims.head_dim, layout.num_layers) == (48, 24, 2)
    ref = layout.role(1, "q")
    assert ref is not None and ref.slot.module == "model.language_model.layers.1.self_attn.q_proj"
    assert layout.weight(ref).shape == (48, 48)


def test_gemma3_checkpoint_under_module_names(tiny_model, tmp_path):
    """A checkpoint saved under the module names (``model.language_model.*``, ``lm_head``,
    ``model.vision_tower.*``; transformers loads it too) reads the same weights."""
    renames = [("language_model.model.", "model.language_model."),
               ("language_model.lm_head", "lm_head"), ("vision_tower.", "model.vision_tower."),
               ("multi_modal_projector.", "model.multi_modal_projector.")]  # fmt: skip

    def rename(weights: dict) -> None:
        for key in list(weights):
            old, new = next(((o, n) for o, n in renames if key.startswith(o)), ("", ""))
            weights[new + key.removeprefix(old)] = weights.pop(key)

    folder = copy_folder(tiny_model("gemma3"), tmp_path / "renamed", tensors=rename)
    assert "model.language_model.layers.0.mlp.down_proj.weight" in Checkpoint(folder).keys()
    layout = Layout(Checkpoint(folder), "model")
    original = Layout(Checkpoint(tiny_model("gemma3")), "model")
    for role in ("q", "down"):
        ref, ref0 = layout.role(1, role), original.role(1, role)
        assert ref is not None and ref0 is not None
        assert torch.equal(layout.weight(ref), original.weight(ref0))
    for field, layer in (("final_norm", None), ("mlp_norm", 0)):  # lm_head: its own weight
        gain, gain0 = layout.norm_gain(field, layer), original.norm_gain(field, layer)
        assert gain is not None and gain0 is not None and torch.equal(gain, gain0)
    head = layout.checkpoint.find(layout.family.data["lm_head"])
    assert head == "lm_head.weight"
    assert (
        original.checkpoint.find(original.family.data["lm_head"]) == "language_model.lm_head.weight"
    )


def test_gemma3_text_config_sizes_left_out_take_transformers_defaults(tiny_model, tmp_path):
    """The hub's Gemma 3 4B config names only some text sizes; transformers fills in the rest
    (Gemma3TextConfig's defaults), and so does the layout."""
    import transformers as tf

    left_out = ["num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"]

    def sparse(config: dict) -> None:
        for name in left_out:
            del config["text_config"][name]

    folder = copy_folder(tiny_model("gemma3"), tmp_path / "sparse", config=sparse)
    dims = Layout(Checkpoint(folder), "model").dims
    defaults = tf.Gemma3TextConfig()
    assert (dims.heads, dims.kv_heads, dims.head_dim, dims.vocab) == tuple(
        getattr(defaults, name) for name in left_out
    )
    assert (dims.hidden, dims.layers) == (48, 2)  # given: kept


def test_gemma3_adapter_on_the_vision_tower_only_is_refused(tiny_model, tmp_path, capsys):
    model = tiny_model("gemma3")
    adapter = make_adapter(model, tmp_path / "vision", target_modules=r".*vision_tower.*\.q_proj")
    err = plan(capsys, adapter, model, tiny_model("llama"), tmp_path / "out", code=2)
    assert "nothing to transfer" in err and VISION in err


def test_gemma3_target_adapter_leaves_the_vision_tower_alone(tiny_model, tiny_adapter, tmp_path):
    out = run(tiny_adapter("llama"), tiny_model("llama"), tiny_model("gemma3"), tmp_path / "out",
              "cross-lora")  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert "q_proj" in config["target_modules"] and "vision_tower" in config["exclude_modules"]
    assert all(".language_model.layers." in m for m in written_modules(out))


def _old_mixtral_layout(tensors: dict) -> None:
    """Add the LoRA factors of a transformers-4 Mixtral adapter on its experts and router."""
    for layer in range(2):
        for module, (out_f, in_f) in [("experts.0.w1", (48, 32)), ("experts.3.w2", (32, 48)),
                                      ("gate", (4, 32))]:  # fmt: skip
            key = f"base_model.model.model.layers.{layer}.block_sparse_moe.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_f)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, 4)


MOE_ADAPTERS = {
    # PEFT (0.17+) on transformers 5: the experts are 3-D parameters (target_parameters)
    "mixtral": dict(target_modules=["q_proj", "v_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                       "gate.weight"]),
    "qwen3_moe": dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    # Qwen2-MoE's shared expert is a Linear MLP: gate_proj/up_proj/down_proj find it
    "qwen2_moe": dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("family", [*MOE_ADAPTERS, "mixtral-v4"])
def test_moe_plan_lists_the_skipped_expert_modules_with_the_reason(
    family, tiny_model, tiny_adapter, tmp_path, capsys
):
    model = tiny_model(family.removesuffix("-v4"))
    if family == "mixtral-v4":  # keys as PEFT wrote them on transformers 4 (block_sparse_moe)
        adapter = copy_folder(tiny_adapter("mixtral"), tmp_path / "v4", tensors=_old_mixtral_layout,
                              config=lambda c: c.update(target_modules=["q_proj", "k_proj",
                                                        "v_proj", "o_proj", "w1", "w2", "gate"]))  # fmt: skip
    else:
        adapter = make_adapter(model, tmp_path / "adapter", **MOE_ADAPTERS[family])
    text = plan(capsys, adapter, model, tiny_model("llama"), tmp_path / "out")
    skips = [line.strip() for line in text.splitlines() if line.strip().startswith("skip ")]
    assert skips and all(f": {MOE_MLP} (" in line for line in skips)
    expected = {
        "mixtral": ["model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer",
                    "model.layers.1.mlp.gate"],
        "qwen3_moe": ["model.layers.1.mlp.experts"],
        "qwen2_moe": ["model.layers.0.mlp.shared_expert.down_proj"],
        "mixtral-v4": ["model.layers.0.block_sparse_moe.experts.0.w1",
                       "model.layers.1.block_sparse_moe.gate"],
    }[family]  # fmt: skip
    named = {line.split(": ", 1)[0].removeprefix("skip ") for line in skips}
    assert set(expected) <= named
    assert "to transfer" in text and "modules: 0 to transfer" not in text


def test_moe_expert_adapter_transfers_its_attention_and_reports_the_experts(tiny_model, tmp_path):
    model = tiny_model("mixtral")
    adapter = make_adapter(model, tmp_path / "adapter", **MOE_ADAPTERS["mixtral"])
    out = run(adapter, model, tiny_model("llama"), tmp_path / "out", "cross-lora")
    assert written_modules(out) == {f"model.layers.{i}.self_attn.{m}_proj" for i in range(2)
                                    for m in "qv"}  # fmt: skip
    report = json.loads((out / "transfer_report.json").read_text())
    assert len(report["skipped"]) == 6
    assert all(s["reason"].startswith(MOE_MLP) for s in report["skipped"])
