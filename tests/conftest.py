"""Tiny random models of every supported family, built once per test session, and random PEFT
adapters on them (made by ``peft`` itself, with B ≠ 0)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

COMMON = {"vocab_size": 96, "max_position_embeddings": 64, "tie_word_embeddings": False}

# name -> (config class, kwargs). Widths, depths and head layouts differ on purpose.
TINY: dict[str, tuple[type, dict]] = {
    "llama": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)),
    "llama-twin": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)),
    "llama-deep": (tf.LlamaConfig, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                                        num_attention_heads=6, num_key_value_heads=3)),
    "mistral": (tf.MistralConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                                   num_attention_heads=5, num_key_value_heads=1)),
    "qwen3": (tf.Qwen3Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "gemma": (tf.GemmaConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
    "gemma2": (tf.Gemma2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=3, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=24)),
    "phi3": (tf.Phi3Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4)),
    # the families of tests/test_families.py
    "olmo2": (tf.Olmo2Config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2)),
    "granite": (tf.GraniteConfig, dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       embedding_multiplier=12.0, residual_multiplier=0.22,
                                       attention_multiplier=1 / 12, logits_scaling=8.0)),
    # Mistral-Nemo: head_dim 12, so that heads × head_dim (48) is not hidden_size (32)
    "mistral-nemo": (tf.MistralConfig, dict(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=12)),
    # Phi-4 is the phi3 architecture: grouped-query attention (4:1) in the fused qkv_proj, and
    # (Phi-4-mini) a partial rotary embedding
    "phi4": (tf.Phi3Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.75,
                                 sliding_window=None)),
    # Gemma 3 multimodal (Gemma3ForConditionalGeneration): the text decoder in text_config, and
    # the smallest vision tower (one layer, one 14x14 patch)
    "gemma3": (tf.Gemma3Config, dict(
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                         vocab_size=96, max_position_embeddings=64),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=1, image_size=14, patch_size=14),
        mm_tokens_per_image=1)),
    "mixtral": (tf.MixtralConfig, dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (tf.Qwen2MoeConfig, dict(hidden_size=32, intermediate_size=64,
                                          moe_intermediate_size=16,
                                          shared_expert_intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (tf.Qwen3MoeConfig, dict(hidden_size=32, intermediate_size=64,
                                          moe_intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          num_experts=3, num_experts_per_tok=2)),
}  # fmt: skip

# PEFT target_modules per family: every q/k/v/o/gate/up/down module it has.
ALL_MODULES = {
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    # mixture-of-experts: attention only (tests/test_families.py adds the experts)
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    cls, kwargs = TINY[name]
    extra = {
        k: v
        for k, v in COMMON.items()
        if not (cls is tf.GPT2Config and k == "max_position_embeddings")
    }
    config = cls(**extra, **kwargs)
    torch.manual_seed(seed + sum(map(ord, name)))
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms, so that norm handling is exercised
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


BYTE_LEVEL = {"qwen2", "qwen3", "gpt2", "gpt_neox"}  # model types with GPT-2-style token strings


def word(i: int) -> str:
    """The tiny tokenizers' i-th word: letters only (``w`` + digits spelt a-j), so that every
    family's pre-tokenizer, Qwen2's letter/digit split included, keeps it whole."""
    return "w" + "".join("abcdefghij"[int(c)] for c in str(i))


def build_tokenizer(name: str):
    """A word-level tokenizer of 96 entries in the family's token-string convention.

    SentencePiece-style families write a leading space as ``▁``, byte-level ones as ``Ġ``; the
    byte-level ones also shuffle ids and swap a few words, so a shared vocabulary must be found
    by text, not by id. ``*-twin`` models share their original's tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_type = TINY[name][0].model_type
    words = [word(i) for i in range(93)]
    marker = "Ġ" if model_type in BYTE_LEVEL else "▁"
    if model_type in BYTE_LEVEL:
        g = torch.Generator().manual_seed(7)
        words = [words[i] for i in torch.randperm(93, generator=g).tolist()]
        words[:5] = ["x" + word(i) for i in range(5)]  # not in the other vocabularies
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {marker + w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # text round-trips through decode and encode, as with real tokenizers: each word carries its
    # leading space as the family's marker
    if model_type in BYTE_LEVEL:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?\S+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
        tok.decoder = decoders.ByteLevel()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name) -> Path``: a saved tiny random model of that family, with a tokenizer."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"model-{name}")
            build_model(name).save_pretrained(path)
            build_tokenizer(name).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return make


def family_modules(name: str) -> list[str]:
    return ALL_MODULES.get(TINY[name][0].model_type, LLAMA_MODULES)


def make_adapter(
    model_dir: Path,
    out: Path,
    target_modules: list[str] | str | None = None,
    r: int = 4,
    alpha: float = 8,
    seed: int = 1,
    b_std: float = 0.5,
    **lora_kwargs,
) -> Path:
    """A random LoRA adapter (B ≠ 0) saved by PEFT itself."""
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model_type = model.config.model_type
    modules = target_modules or ALL_MODULES.get(model_type, LLAMA_MODULES)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False,
                        fan_in_fan_out=model_type == "gpt2", **lora_kwargs)  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random init is small; make the update clearly visible
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, b_std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    """``tiny_adapter(name, **kw) -> Path``: a random adapter on every module of the family."""
    cache: dict[tuple, Path] = {}

    def make(name: str, **kwargs) -> Path:
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = make_adapter(tiny_model(name), tmp_path_factory.mktemp(f"adapter-{name}"),
                                      **kwargs)  # fmt: skip
        return cache[key]

    return make


def load_with_adapter(model_dir: Path, adapter_dir: Path | None):
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else model


def delta_weights(peft_model) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module as PEFT itself applies it, (out, in) orientation."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            delta = module.get_delta_weight("default")
            if module.fan_in_fan_out:
                delta = delta.T
            out[name.removeprefix("base_model.model.")] = delta.detach()
    return out


TOKENS = torch.tensor([[3, 17, 42, 8, 91, 5, 60, 33, 2, 71, 12, 49]])


# --- shared test helpers: the transfer command line, edited copies of inputs, folder snapshots --


def transfer_argv(
    adapter: Path | str | Sequence[Path | str],
    source: Path | str,
    target: Path | str,
    out: Path | str,
    method: str | None = "copy",
    *extra: object,
) -> list[str]:
    """``crosslora transfer`` arguments (for ``crosslora.cli.main`` or after the console script).

    ``adapter`` may be a list (one ``--adapter`` each, in order); ``method=None`` passes no
    ``--method`` (the default method); ``extra`` (``"-q"``, ``"--dry-run"``, ...) goes last.
    """
    adapters = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    argv = ["transfer"]
    for a in adapters:
        argv += ["--adapter", str(a)]
    argv += ["--source-model", str(source), "--target-model", str(target), "--out-path", str(out)]
    if method is not None:
        argv += ["--method", method]
    return [*argv, *map(str, extra)]


def copy_folder(
    folder: Path,
    dst: Path,
    config: Callable[[dict], object] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
) -> Path:
    """``folder`` (an adapter or a model) copied to ``dst`` (parents created): the same files,
    copies of their own. A copied model is another model: crosslora refuses to transfer between
    a model and itself except with --method copy.

    ``config(dict)`` edits the copy's config in place (``adapter_config.json`` for an adapter,
    else ``config.json``); ``tensors(dict)`` its weights (``adapter_model.safetensors``, else
    ``model.safetensors``; written back with PEFT's and transformers' ``format: pt`` metadata).
    """
    shutil.copytree(folder, dst)
    adapter = (dst / "adapter_config.json").is_file()
    if config:
        path = dst / ("adapter_config.json" if adapter else "config.json")
        data = json.loads(path.read_text())
        config(data)
        path.write_text(json.dumps(data))
    if tensors:
        path = dst / ("adapter_model.safetensors" if adapter else "model.safetensors")
        weights = load_file(path)
        tensors(weights)
        save_file(weights, path, metadata={"format": "pt"})
    return dst


def pickle_adapter(adapter: Path, folder: Path, payload: object = None) -> Path:
    """``adapter``'s config in ``folder`` (created), beside its weights as a pickle,
    ``adapter_model.bin`` only; or ``payload`` pickled instead of the weights."""
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    state = load_file(adapter / "adapter_model.safetensors") if payload is None else payload
    torch.save(state, folder / "adapter_model.bin")
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with what it holds: a file's bytes, None for a folder, and for
    a symbolic link ``b"->"`` and its target (links are not followed into folders; a link to a
    regular file adds that file's bytes after a NUL). A missing folder is ``{}``."""
    out: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            link = b"->" + os.fsencode(os.readlink(p))
            out[rel] = link + b"\0" + p.read_bytes() if p.is_file() else link
        else:
            out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def hub_cache(tmp_path: Path, monkeypatch, repos: dict[str, Path]) -> Path:
    """``repos`` (hub id -> model folder) in a hub cache under ``tmp_path`` (the hub's own
    layout: ``models--org--name/snapshots/<commit>``, ``refs/main``), used offline."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, folder in repos.items():
        root = cache / f"models--{repo.replace('/', '--')}"
        copy_folder(folder, root / "snapshots" / commit)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache
