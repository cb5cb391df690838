"""The transfer command end to end on tiny random models: identity, loading, format, safety and
fused layouts (issue 2's acceptance properties)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TOKENS, copy_folder, delta_weights, load_with_adapter, transfer_argv
from crosslora.cli import main

GOLDEN = Path(__file__).parent / "golden"


def transfer(adapter, src, tgt, out, method, *extra) -> Path:
    assert main(transfer_argv(adapter, src, tgt, out, method, "-q", *extra)) == 0
    return Path(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- 1. identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "gpt_neox"])
def test_copy_onto_the_same_model_is_bit_for_bit(family, tiny_model, tiny_adapter, tmp_path):
    model, adapter = tiny_model(family), tiny_adapter(family)
    out = transfer(adapter, model, model, tmp_path / "out", "copy")
    before, after = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype
        assert torch.equal(after[key], before[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "gpt_neox"])
def test_cross_lora_at_full_rank_onto_the_same_model_reproduces_delta_w(
    family, tiny_model, tiny_adapter, tmp_path
):
    model, adapter = tiny_model(family), tiny_adapter(family)
    same = copy_folder(model, tmp_path / "same")  # the model itself is refused (not copy)
    out = transfer(
        adapter, model, same, tmp_path / "out", "cross-lora", "--truncation-rank", "full"
    )
    want = delta_weights(load_with_adapter(model, adapter))
    got = delta_weights(load_with_adapter(model, out))
    assert want.keys() == got.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_cross_lora_at_the_papers_rank_is_not_the_identity_on_non_square_modules(
    tiny_model, tiny_adapter, tmp_path
):
    """Truncation really truncates: k=8 < 32 loses part of every update (the report says how much)."""
    model, adapter = tiny_model("llama"), tiny_adapter("llama")
    same = copy_folder(model, tmp_path / "same")
    out = transfer(adapter, model, same, tmp_path / "out", "cross-lora", "--truncation-rank", "8")
    report = json.loads((out / "transfer_report.json").read_text())
    kept = [m["diagnostics"]["norm_kept"] for m in report["modules"]]
    assert all(0 < k < 0.999 for k in kept)


# --- 2. loading -----------------------------------------------------------------------------

CROSS_PAIRS = [
    ("llama", "qwen2"), ("qwen2", "gemma3_text"), ("gemma3_text", "llama-deep"), ("gpt2", "llama"),
    ("llama", "gpt_neox"), ("gpt_neox", "gpt2"), ("phi3", "qwen3"), ("gemma", "phi3"),
    ("gemma2", "mistral"),
]  # fmt: skip
SAME_SHAPE_PAIRS = [("llama", "llama-twin"), ("mistral", "llama"), ("gemma", "gemma2")]
# matched needs tokenizers that encode text; the tiny byte-level ones cannot under transformers'
# own Qwen2/GPT-2 tokenizer classes (see test_anchored.py), so it runs on the others' pairs
MATCHED_PAIRS = [("gemma3_text", "llama-deep"), ("gemma", "phi3"), ("gemma2", "mistral"),
                 ("llama", "llama-twin")]  # fmt: skip
CASES = (
    [(s, t, m) for s, t in CROSS_PAIRS for m in ("anchored", "cross-lora", "crop-pad")]
    + [(s, t, m) for s, t in SAME_SHAPE_PAIRS for m in ("copy", "lora-x", "anchored")]
    + [(s, t, "matched") for s, t in MATCHED_PAIRS]
)


@pytest.mark.parametrize(("src", "tgt", "method"), CASES)
def test_output_loads_in_peft_and_changes_the_logits(
    src, tgt, method, tiny_model, tiny_adapter, tmp_path
):
    out = transfer(tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out", method,
                   "--layer-map", "depth")  # fmt: skip
    base = load_with_adapter(tiny_model(tgt), None)
    peft_model = load_with_adapter(tiny_model(tgt), out)
    # every saved tensor found its module, and every LoRA module found its tensors
    result = peft_model.load_adapter(out, adapter_name="again")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k and ".again." in k]
    with torch.no_grad():
        base_logits, logits = base(TOKENS).logits, peft_model(TOKENS).logits
    assert torch.isfinite(logits).all()
    assert (logits - base_logits).abs().max() > 1e-4


def test_copy_and_lora_x_refuse_different_shapes(tiny_model, tiny_adapter, tmp_path, capsys):
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2"),
                         tmp_path / "out", "copy")  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("crosslora: error: nothing to transfer with method copy")
    assert "needs equal shapes" in err[-1]
    assert not (tmp_path / "out").exists()


# --- 3. format ------------------------------------------------------------------------------


def written(out: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def peft_expected(model_dir: Path, out: Path) -> dict[str, tuple[int, ...]]:
    """The keys and shapes PEFT itself creates for the written config on the target."""
    import transformers as tf

    config = LoraConfig.from_pretrained(str(out))
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = get_peft_model_state_dict(get_peft_model(model, config))
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize(("src", "tgt", "method"), [
    ("llama", "qwen2", "cross-lora"), ("gpt2", "llama-deep", "crop-pad"),
    ("llama", "gpt_neox", "cross-lora"), ("phi3", "gpt2", "crop-pad"), ("mistral", "llama", "lora-x"),
])  # fmt: skip
def test_written_keys_and_shapes_are_exactly_what_peft_creates(
    src, tgt, method, tiny_model, tiny_adapter, tmp_path
):
    out = transfer(tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out", method)
    assert written(out) == peft_expected(tiny_model(tgt), out)


def test_golden_manifest(tiny_model, tiny_adapter, tmp_path):
    """Keys, shapes and config fields of a fixed transfer, pinned in tests/golden."""
    out = transfer(tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2"), tmp_path / "out",
                   "cross-lora")  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = {
        "tensors": {k: list(v) for k, v in sorted(written(out).items())},
        "config": {k: sorted(config[k]) if k == "target_modules" else config[k] for k in
                   ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                    "alpha_pattern", "fan_in_fan_out", "bias", "task_type", "layers_to_transform",
                    "layers_pattern")},
    }  # fmt: skip
    golden = json.loads((GOLDEN / "llama_to_qwen2_cross_lora.json").read_text())
    assert manifest == golden
    # a local folder whose config names no hub id: named by the folder's name, not its path
    assert config["base_model_name_or_path"] == tiny_model("qwen2").name
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["crosslora_method"] == "cross-lora"
    assert meta["crosslora_source_model"] == str(tiny_model("llama"))
    assert meta["crosslora_target_model"] == str(tiny_model("qwen2"))
    assert meta["crosslora_version"]


@pytest.mark.parametrize(
    ("src", "tgt"), [("llama", "qwen2"), ("gpt2", "gpt_neox"), ("llama", "phi3")]
)
def test_rank_is_at_most_r_per_role(src, tgt, tiny_model, tiny_adapter, tmp_path):
    """Each role keeps rank ≤ r; a fused target module joins its roles exactly (≤ r per role).
    Every module is stored at the config's one rank (the largest; others zero-padded)."""
    out = transfer(
        tiny_adapter(src), tiny_model(src), tiny_model(tgt), tmp_path / "out", "cross-lora"
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["rank_pattern"]
    fused_roles = {"c_attn": 3, "query_key_value": 3, "qkv_proj": 3, "gate_up_proj": 2}
    tensors = load_file(out / "adapter_model.safetensors")
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            roles = fused_roles.get(module.rsplit(".", 1)[-1], 1)
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            assert A.shape[0] == config["r"]
            assert torch.linalg.matrix_rank(B.double() @ A.double()) <= 4 * roles


def test_report_and_model_card(tiny_model, tiny_adapter, tmp_path):
    out = transfer(tiny_adapter("qwen2"), tiny_model("qwen2"), tiny_model("llama"), tmp_path / "out",
                   "cross-lora")  # fmt: skip
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["layer_map"]["unmatched_source_layers"] == [2]  # 3 layers -> 2, by index
    assert report["summary"]["transferred"] == 14
    m = report["modules"][0]
    assert {"source_key", "target_key", "source_shape", "target_shape", "seconds", "method",
            "diagnostics", "layer"} <= m.keys()  # fmt: skip
    assert m["source_shape"] == [40, 40] and m["target_shape"] == [32, 32]  # q_proj
    card = (out / "README.md").read_text()
    assert "not trained" in card and str(tiny_model("llama")) in card


def test_model_card_says_how_the_calibrated_size_departs_from_least_squares():
    from crosslora.report import _fidelity_line

    diag = {"probe_effect": {"corr": 0.35, "explained": 0.06}, "disattenuation": 1.69,
            "probe_effect_least_squares": {"corr": 0.35, "explained": 0.136}}  # fmt: skip
    line = " ".join(_fidelity_line({"method_diagnostics": diag}).split())
    assert "explains 6% of the source adapter's effect" in line and "(correlation 0.35)" in line
    assert "sized 1.69× the least-squares fit to that effect (which explains 14%)" in line
    diag = {"probe_effect": {"corr": 1.0, "explained": 1.0}, "disattenuation": 1.0}
    line = " ".join(_fidelity_line({"method_diagnostics": diag}).split())
    assert line.endswith("(correlation 1.00).") and "least-squares" not in line
    assert _fidelity_line({"method_diagnostics": {}}) == ""


# --- 4. safety ------------------------------------------------------------------------------


def test_dry_run_writes_nothing_and_prints_the_plan(tiny_model, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    # the default method (None: no --method)
    argv = transfer_argv(tiny_adapter("gpt2"), tiny_model("gpt2"), tiny_model("llama-deep"), out,
                         None, "--dry-run", "--layer-map", "depth")  # fmt: skip
    assert main(argv) == 0
    assert list(tmp_path.iterdir()) == []
    plan = capsys.readouterr().out
    assert "layer map: depth, 2 source -> 4 target layers, 2 matched" in plan
    assert "0->0 1->3" in plan
    assert (
        "transformer.h.0.attn.c_attn[k] (32x32) -> model.layers.0.self_attn.k_proj (24x48)" in plan
    )
    assert "skip transformer.h.0.mlp.c_fc" not in plan
    assert "the target has no" not in plan
    # the default method's last step, its memory, its time, what the benchmark measured
    then, need, took, expect = plan.rstrip().splitlines()[-4:]
    assert then == "then: calibrate each role's update by its effect on the probe text's likelihood"
    assert need.startswith("memory: about ") and " wait on disk" in need, need
    assert re.search(r", and the pair cache keeps the fits, \d+\.\d GB\)$", need), need
    assert took.startswith("time: about ") and "on this machine" in took, took
    assert expect.startswith("expect: on the six-pair benchmark matched recovered 0.27"), expect


def test_existing_output_is_refused_unless_crosslora_wrote_it(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = [tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2")]
    capsys.readouterr()  # drop fixture output
    argv = transfer_argv(*args, out, "cross-lora")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"crosslora: error: output folder {out} is not empty (pass --overwrite to replace it)"
    ]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert main([*argv, "--overwrite", "-q"]) == 2  # not crosslora's: --overwrite refuses too
    assert "it was not written by crosslora" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()  # empty: written into
    assert main([*argv, "-q"]) == 0
    assert main([*argv, "--overwrite", "-q"]) == 0  # crosslora's own: replaced
    assert (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


# --- 5. fused layouts -----------------------------------------------------------------------


def crop_pad(delta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(shape)
    m, n = min(shape[0], delta.shape[0]), min(shape[1], delta.shape[1])
    out[:m, :n] = delta[:m, :n]
    return out


def gpt2_parts(delta: torch.Tensor) -> list[torch.Tensor]:
    """GPT-2's own split: ``c_attn(x).split(embed_dim, dim=2)``."""
    return list(delta.split(delta.shape[0] // 3, dim=0))


def neox_parts(delta: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """GPT-NeoX's own split: ``view(..., heads, 3 * head_dim)`` then ``chunk(3)``."""
    per_head = delta.reshape(heads, 3, -1, delta.shape[1])
    return [per_head[:, i].reshape(-1, delta.shape[1]) for i in range(3)]


def phi3_parts(delta: torch.Tensor, q: int, kv: int) -> list[torch.Tensor]:
    return list(delta.split([q, kv, kv], dim=0))


def test_fused_gpt2_source_rows_land_on_the_right_roles(tiny_model, tiny_adapter, tmp_path):
    out = transfer(
        tiny_adapter("gpt2"), tiny_model("gpt2"), tiny_model("llama"), tmp_path / "o", "crop-pad"
    )
    src = delta_weights(load_with_adapter(tiny_model("gpt2"), tiny_adapter("gpt2")))
    tgt = delta_weights(load_with_adapter(tiny_model("llama"), out))
    for layer in range(2):
        q, k, v = gpt2_parts(src[f"transformer.h.{layer}.attn.c_attn"])
        for role, part in zip("qkv", (q, k, v)):
            got = tgt[f"model.layers.{layer}.self_attn.{role}_proj"]
            assert torch.allclose(got, crop_pad(part, tuple(got.shape)), atol=1e-6), (layer, role)


def test_fused_gpt_neox_target_rows_receive_the_right_roles(tiny_model, tiny_adapter, tmp_path):
    out = transfer(
        tiny_adapter("llama"),
        tiny_model("llama"),
        tiny_model("gpt_neox"),
        tmp_path / "o",
        "crop-pad",
    )
    src = delta_weights(load_with_adapter(tiny_model("llama"), tiny_adapter("llama")))
    tgt = delta_weights(load_with_adapter(tiny_model("gpt_neox"), out))
    for layer in range(2):
        parts = neox_parts(tgt[f"gpt_neox.layers.{layer}.attention.query_key_value"], heads=4)
        for role, got in zip("qkv", parts):
            want = crop_pad(src[f"model.layers.{layer}.self_attn.{role}_proj"], tuple(got.shape))
            assert torch.allclose(got, want, atol=1e-6), (layer, role)


def test_fused_to_fused_copy_reorders_rows_between_layouts(tiny_model, tiny_adapter, tmp_path):
    """GPT-NeoX's interleaved q/k/v rows become GPT-2's contiguous blocks, factors untouched."""
    out = transfer(
        tiny_adapter("gpt_neox"), tiny_model("gpt_neox"), tiny_model("gpt2"), tmp_path / "o", "copy"
    )
    src = delta_weights(load_with_adapter(tiny_model("gpt_neox"), tiny_adapter("gpt_neox")))
    tgt = delta_weights(load_with_adapter(tiny_model("gpt2"), out))
    for layer in range(2):
        want = neox_parts(src[f"gpt_neox.layers.{layer}.attention.query_key_value"], heads=4)
        got = gpt2_parts(tgt[f"transformer.h.{layer}.attn.c_attn"])
        for role, g, w in zip("qkv", got, want):
            assert torch.allclose(g, w, atol=1e-6), (layer, role)
        assert torch.allclose(tgt[f"transformer.h.{layer}.mlp.c_fc"],
                              src[f"gpt_neox.layers.{layer}.mlp.dense_h_to_4h"], atol=1e-6)  # fmt: skip
    # shared A, stacked B: the fused module keeps rank r
    assert written(out)["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 32)


def test_fused_phi3_to_gpt_neox_with_cross_lora_matches_the_unfused_computation(
    tiny_model, tiny_adapter, tmp_path
):
    """Each role's transfer equals Cross-LoRA applied to that role's own rows, done densely."""
    from crosslora.linalg import svd_bases

    out = transfer(tiny_adapter("phi3"), tiny_model("phi3"), tiny_model("gpt_neox"), tmp_path / "o",
                   "cross-lora", "--truncation-rank", "12")  # fmt: skip
    src_model = load_with_adapter(tiny_model("phi3"), tiny_adapter("phi3"))
    tgt_model = load_with_adapter(tiny_model("gpt_neox"), out)
    src, tgt = delta_weights(src_model), delta_weights(tgt_model)
    w_src = phi3_parts(
        src_model.base_model.model.model.layers[1].self_attn.qkv_proj.base_layer.weight.detach(),
        32,
        16,
    )
    w_tgt = neox_parts(
        tgt_model.base_model.model.gpt_neox.layers[
            1
        ].attention.query_key_value.base_layer.weight.detach(),
        4,
    )
    d_src = phi3_parts(src["model.layers.1.self_attn.qkv_proj"], 32, 16)
    d_tgt = neox_parts(tgt["gpt_neox.layers.1.attention.query_key_value"], 4)
    for role, ws, wt, ds, dt in zip("qkv", w_src, w_tgt, d_src, d_tgt):
        k_u, k_v = min(12, ws.shape[0], wt.shape[0]), min(12, ws.shape[1], wt.shape[1])
        u_s, _, v_s = svd_bases(ws, k_u, k_v, "exact")
        u_t, _, v_t = svd_bases(wt, k_u, k_v, "exact")
        want = u_t @ (u_s.T @ ds @ v_s) @ v_t.T
        assert rel_err(dt, want) < 1e-4, role


def test_merge_layer_map_adds_every_source_layer_and_keeps_the_rank(
    tiny_model, tiny_adapter, tmp_path
):
    """A deeper source (4 layers) onto a shallower target (2): ``merge`` sends every source layer
    somewhere; the updates landing on one target layer add, and the written LoRA is the best
    rank-r approximation of that sum (checked densely, with crop-pad's maps)."""
    from safetensors.torch import load_file

    src, tgt, adapter = tiny_model("llama-deep"), tiny_model("llama"), tiny_adapter("llama-deep")
    out = transfer(adapter, src, tgt, tmp_path / "out", "crop-pad", "--layer-map", "merge")
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["layer_map"]["unmatched_source_layers"] == []
    pairs = {int(i): j for i, j in report["layer_map"]["pairs"].items()}
    assert pairs == {0: 0, 1: 0, 2: 1, 3: 1}
    cfg = json.loads((out / "adapter_config.json").read_text())
    src_cfg = json.loads((adapter / "adapter_config.json").read_text())
    r = src_cfg["r"]
    assert cfg["r"] == r
    got, given = (
        load_file(out / "adapter_model.safetensors"),
        load_file(adapter / "adapter_model.safetensors"),
    )
    prefix = "base_model.model.model.layers"
    for j in (0, 1):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            b = got[f"{prefix}.{j}.{mod}.lora_B.weight"].double()
            a = got[f"{prefix}.{j}.{mod}.lora_A.weight"].double()
            m, n = b.shape[0], a.shape[1]
            want = sum(
                given[f"{prefix}.{i}.{mod}.lora_B.weight"].double()[:m]
                @ given[f"{prefix}.{i}.{mod}.lora_A.weight"].double()[:, :n]
                for i, t in pairs.items() if t == j
            )  # fmt: skip
            u, s_, vh = torch.linalg.svd(want)
            best = (u[:, :r] * s_[:r]) @ vh[:r]
            assert torch.allclose(b @ a, best, atol=1e-5 * float(best.abs().max())), (j, mod)
            assert s_[r] > 1e-6 * s_[0]  # the sum really had more than rank r to truncate
