"""Every failure a user can cause (issue 7): exit 2, one line ``crosslora: error: ...`` that names
the file, field or option, no traceback, and nothing written.

The table below runs in-process through ``crosslora.cli.main``; a subset also runs through the
real console script in a subprocess, to prove that nothing else (a traceback, a library warning)
reaches stderr. Mount-based cases (read-only folder, full disk) need root and skip otherwise; the
full disk is also simulated without a mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_folder, pickle_adapter, snapshot, transfer_argv
from crosslora.cli import main
from crosslora.methods import expectation

CLI = Path(sys.executable).with_name("crosslora")
SRC = Path(__file__).resolve().parents[1] / "src"


# --- the environment each case builds its inputs in -------------------------------------------


class Env:
    """Inputs under ``tmp/in``; the output goes to ``tmp/work/out`` unless a case says otherwise."""

    def __init__(self, tmp: Path, tiny_model, tiny_adapter, stack: contextlib.ExitStack) -> None:
        self.tmp = tmp
        self.inputs = tmp / "in"
        self.inputs.mkdir(parents=True)
        self.work = tmp / "work"
        self.work.mkdir()
        self.out = self.work / "out"
        self.model = tiny_model("llama")
        self.adapter = tiny_adapter("llama")
        self.tiny_model = tiny_model
        self.stack = stack

    def argv(self, adapter=None, src=None, tgt=None, out=None, method="copy", *extra) -> list[str]:
        """``transfer_argv`` with this environment's adapter, model (as source and target) and
        output where not given."""
        return transfer_argv(adapter or self.adapter, src or self.model, tgt or self.model,
                             out or self.out, method, *extra)  # fmt: skip

    def copy_adapter(self, config=None, tensors=None, name="ad") -> Path:
        return copy_folder(self.adapter, self.inputs / name, config, tensors)

    def copy_model(self, config=None, tensors=None, name="model") -> Path:
        return copy_folder(self.model, self.inputs / name, config, tensors)

    def mount_tmpfs(self, name: str, options: str) -> Path:
        """A tmpfs under ``work`` (unmounted at the end), or skip where mounting is not allowed."""
        where = self.work / name
        where.mkdir()
        if not shutil.which("mount") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.stack.callback(subprocess.run, ["umount", "-l", str(where)], capture_output=True)
        return where


def rewrite_safetensors(path: Path, edit: Callable[[dict], None] | None = None,
                        raw: Callable[[bytes, bytes], bytes] | None = None) -> None:  # fmt: skip
    """Edit the JSON header of a safetensors file (keeping its data block), or its raw bytes."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    if edit:
        edit(header)
        text = json.dumps(header).encode()
        blob = len(text).to_bytes(8, "little") + text + data
    if raw:
        blob = raw(blob, data)
    path.write_bytes(blob)


def without(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value."""
    at = argv.index(option)
    return argv[:at] + argv[at + 2 :]


def lora_entries(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def adapter_with_header(env: Env, edit=None, raw=None) -> Path:
    ad = env.copy_adapter()
    rewrite_safetensors(ad / "adapter_model.safetensors", edit, raw)
    return ad


def nan_b(tensors: dict, which: Callable[[str], bool] = lambda k: True) -> None:
    for k in tensors:
        if "lora_B" in k and which(k):
            tensors[k] = torch.full_like(tensors[k], float("nan"))


def rank_too_large(env: Env) -> Path:
    """k_proj is (16, 32) in the tiny llama; an adapter of rank 20 on it cannot be a LoRA of it."""
    ad = env.inputs / "rank20"
    ad.mkdir()
    cfg = json.loads((env.adapter / "adapter_config.json").read_text())
    cfg.update(r=20, lora_alpha=20, target_modules=["k_proj"], rank_pattern={}, alpha_pattern={})
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}.self_attn.k_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(20, 32)
        tensors[f"{key}.lora_B.weight"] = torch.randn(16, 20)
    save_file(tensors, ad / "adapter_model.safetensors", metadata={"format": "pt"})
    return ad


def foreign_modules(env: Env) -> Path:
    """Modules that are not q/k/v/o/gate/up/down of the source family (and listed as targets)."""

    def rename(ts: dict) -> None:
        for k in list(ts):
            ts[re.sub(r"\.(self_attn|mlp)\.(\w+)_proj\.", r".\1.\2_lin.", k)] = ts.pop(k)

    return env.copy_adapter(
        lambda c: c.update(target_modules=[f"{m}_lin" for m in ("q", "k", "v", "o", "gate", "up",
                                                                 "down")]),
        rename,
    )  # fmt: skip


def sharded_with_missing_shard(env: Env) -> Path:
    m = env.inputs / "sharded"
    m.mkdir()
    shutil.copy(env.model / "config.json", m)
    tensors = load_file(env.model / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, m / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("model-00001-of-00002.safetensors" if i < half
                                                else "model-00002-of-00002.safetensors")
                                            for i, k in enumerate(keys)}}  # fmt: skip
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def bad_index(env: Env) -> Path:
    m = sharded_with_missing_shard(env)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: [v] for k, v in index["weight_map"].items()}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def only_pickle_model(env: Env) -> Path:
    m = env.inputs / "binmodel"
    m.mkdir()
    shutil.copy(env.model / "config.json", m)
    torch.save(load_file(env.model / "model.safetensors"), m / "pytorch_model.bin")
    return m


def inf_in_every_weight(ts: dict) -> None:
    for k in ts:
        if re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", k):
            ts[k] = ts[k].clone()
            ts[k][0, 0] = float("inf")


def no_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``build(env) -> (argv, fragment)``: the error line must contain ``fragment``."""

    build: Callable[[Env], tuple[list[str], str]]
    warnings: bool = False  # warning lines ("warning: skipping ...") may precede the error
    subprocess: bool = False  # also run through the console script
    in_process: bool = True  # False: only through the console script (it needs its environment)


def E(build, **kw) -> Case:  # noqa: N802
    return Case(build, **kw)


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def edited(folder: Path, name: str, text: str | None) -> Path:
    """``folder`` with file ``name`` removed (None), replaced by a folder ("mkdir"), or rewritten."""
    (folder / name).unlink()
    if text == "mkdir":
        (folder / name).mkdir()
    elif text is not None:
        (folder / name).write_text(text)
    return folder


def locked_folder(env: Env) -> Path:
    """A folder without write permission (root ignores permission bits: the read-only mount and
    /proc cases cover it there)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (see output-read-only-mount)")
    locked = env.work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env.stack.callback(locked.chmod, 0o755)
    return locked


def truncated_model(env: Env) -> Path:
    m = env.copy_model()
    rewrite_safetensors(m / "model.safetensors", raw=lambda b, d: b[: len(b) - 100])
    return m


def fifo(env: Env, folder: Path, name: str) -> Path:
    """``folder`` with file ``name`` replaced by a FIFO that nothing writes to. Should a reader
    block on it anyway, a helper opens and closes its other end every few seconds, so that the
    reader sees an empty file and the case fails instead of hanging the suite."""
    (folder / name).unlink()
    os.mkfifo(folder / name)
    stop = threading.Event()

    def unblock() -> None:
        while not stop.wait(5):
            with contextlib.suppress(OSError):  # ENXIO while no reader has it open
                os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    env.stack.callback(stop.set)
    return folder


def dev_zero(folder: Path, name: str) -> Path:
    """``folder`` with file ``name`` a symlink to /dev/zero (endless zeros)."""
    (folder / name).unlink()
    (folder / name).symlink_to("/dev/zero")
    return folder


def no_weights_model(env: Env) -> Path:
    m = env.inputs / "noweights"
    m.mkdir()
    shutil.copy(env.model / "config.json", m)
    return m


def weight(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    """A tensors edit: ``model.layers.0.<key>.weight`` replaced by ``value(old)``."""
    name = f"model.layers.0.{key}.weight"
    return lambda ts: ts.update({name: value(ts[name])})


def not_utf8(env: Env, src: Path, name: bytes) -> Path:
    """A copy of ``src`` in a folder whose name is not valid UTF-8 (as Python spells it: with
    surrogate escapes)."""
    return copy_folder(src, Path(os.fsdecode(os.fsencode(env.inputs) + b"/" + name)))


def raw_config(env: Env, edit: Callable[[str], str]) -> Path:
    """A copy of the adapter whose config text is ``edit(text)`` (JSON that json.dumps would not
    write, e.g. a lone surrogate escape)."""
    ad = env.copy_adapter()
    path = ad / CONFIG
    text = edit(path.read_text())
    assert text != path.read_text(), "the edit found nothing to change"
    path.write_text(text, encoding="ascii")
    return ad


def quick_patterns(env: Env) -> None:
    """Pattern matching gives up after 1 s in these cases (10 s by default)."""
    from crosslora.io import patterns

    env.stack.callback(setattr, patterns, "LIMIT_SECONDS", patterns.LIMIT_SECONDS)
    patterns.LIMIT_SECONDS = 1.0


SLOW = "(.+)+X"  # exponential backtracking in re against any module name (it has no X)


def slow_pattern(env: Env, **fields) -> Path:
    quick_patterns(env)
    return env.copy_adapter(lambda c: c.update(**fields))


def extra_layer_adapter(env: Env) -> Path:
    """The adapter with its layer 1 modules repeated as layer 5 (the source has 2 layers)."""
    return env.copy_adapter(tensors=lambda ts: ts.update(
        {k.replace(".layers.1.", ".layers.5."): v.clone() for k, v in ts.items()
         if ".layers.1." in k}))  # fmt: skip


def linked_model(env: Env, how: str) -> Path:
    """The tiny model again: the same folder through a symlink, or a folder of its own whose
    weights file is a hard link to the model's."""
    where = env.inputs / f"{how}-model"
    if how == "symlink":
        where.symlink_to(env.model, target_is_directory=True)
        return where
    where.mkdir()
    shutil.copy(env.model / "config.json", where)
    os.link(env.model / "model.safetensors", where / "model.safetensors")
    return where


SAME = "the source and target models are the same model"
ALREADY = "the adapter already fits it; use it as it is (or pass --method copy to copy it)"


CASES: dict[str, Case] = {
    # adapter folder and config
    "adapter-folder-missing": E(lambda e: (e.argv(adapter=e.inputs / "nope"),
                                           f"adapter {e.inputs / 'nope'}: no such folder")),
    "adapter-is-a-file": E(lambda e: (e.argv(adapter=e.adapter / "adapter_config.json"),
                                      f"adapter {e.adapter / 'adapter_config.json'} is a file")),
    "adapter-config-missing": E(lambda e: (
        e.argv(adapter=(a := edited(e.copy_adapter(), CONFIG, None))),
        f"adapter config: {a / CONFIG} not found")),
    "adapter-config-invalid-json": E(lambda e: (
        e.argv(adapter=(a := edited(e.copy_adapter(), CONFIG, '{"r": 4,'))),
        f"adapter config: {a / CONFIG} is not valid JSON"), subprocess=True),
    "adapter-config-json-array": E(lambda e: (
        e.argv(adapter=(a := edited(e.copy_adapter(), CONFIG, "[1, 2]"))),
        f"adapter config: {a / CONFIG} must hold a JSON object")),
    "config-r-string": E(lambda e: (e.argv(adapter=e.copy_adapter(lambda c: c.update(r="4"))),
                                    "field 'r' has the wrong type")),
    "config-r-zero": E(lambda e: (e.argv(adapter=e.copy_adapter(lambda c: c.update(r=0))),
                                  "r must be positive")),
    "config-lora-alpha-list": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(lora_alpha=[8]))),
        "field 'lora_alpha' has the wrong type")),
    "config-lora-alpha-nan": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(lora_alpha=float("nan")))),
        "lora_alpha must be a finite number")),
    "config-target-modules-int": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(target_modules=7))),
        "field 'target_modules' has the wrong type")),
    "config-target-modules-bad-regex": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(target_modules="(q_proj"))),
        "target_modules is not a regex")),
    "config-rank-pattern-negative": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(rank_pattern={"q_proj": -4}))),
        "rank_pattern['q_proj'] must be a positive integer")),
    "config-alpha-pattern-string": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(alpha_pattern={"q_proj": "8"}))),
        "alpha_pattern['q_proj'] must be a positive number")),
    "config-use-rslora-string": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(use_rslora="yes"))),
        "field 'use_rslora' has the wrong type")),
    "config-lora-dropout-string": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(lora_dropout="0.1"))),
        "field 'lora_dropout' has the wrong type")),
    "config-layers-to-transform-strings": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(layers_to_transform=["0"]))),
        "field 'layers_to_transform' must list layer indices")),
    "peft-type-loha": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(peft_type="LOHA"))),
        "peft_type 'LOHA' is not supported")),
    "dora-config": E(lambda e: (e.argv(adapter=e.copy_adapter(lambda c: c.update(use_dora=True))),
                                "use_dora=true")),
    "dora-magnitude-tensor": E(lambda e: (e.argv(adapter=e.copy_adapter(tensors=lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}
    ))), "lora_magnitude_vector is a DoRA magnitude")),
    "target-modules-match-nothing": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(target_modules=["nothing_here"]))),
        "is not in target_modules=['nothing_here']")),
    "modules-foreign-to-the-source-family": E(lambda e: (
        e.argv(adapter=foreign_modules(e)), "none of the adapter's modules is a llama-family module")),
    "rank-larger-than-the-matrix": E(lambda e: (
        e.argv(adapter=rank_too_large(e)),
        "model.layers.0.self_attn.k_proj: rank 20 exceeds its matrix (16, 32)")),
    "rank-disagrees-with-config": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(r=8))), "has rank 4 but the config says r=8")),
    # adapter weights
    "adapter-weights-missing": E(lambda e: (
        e.argv(adapter=(a := edited(e.copy_adapter(), WEIGHTS, None))),
        f"adapter {a}: no adapter_model.safetensors found")),
    "adapter-weights-are-a-folder": E(lambda e: (
        e.argv(adapter=(a := edited(e.copy_adapter(), WEIGHTS, "mkdir"))),
        f"{a / WEIGHTS}: cannot read")),
    "pickle-without-allow-pickle": E(lambda e: (
        e.argv(adapter=pickle_adapter(e.adapter, e.inputs / "pickled")),
        "weights are a pickle (adapter_model.bin); pass --allow-pickle")),
    "pickle-with-code": E(lambda e: (
        e.argv(pickle_adapter(e.adapter, e.inputs / "pickled", {"x": os.getcwd}), None, None, None, "copy", "--allow-pickle"),
        "adapter_model.bin: cannot load with weights_only=True")),
    "pickle-not-a-dict": E(lambda e: (
        e.argv(pickle_adapter(e.adapter, e.inputs / "pickled", [torch.ones(2)]), None, None, None, "copy", "--allow-pickle"),
        "adapter_model.bin: not a dict of tensors")),
    "lora-B-missing": E(lambda e: (e.argv(adapter=e.copy_adapter(tensors=lambda t: t.pop(
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"))),
        "module model.layers.1.mlp.up_proj has no lora_B tensor")),
    "lora-integer-dtype": E(lambda e: (e.argv(adapter=e.copy_adapter(tensors=lambda t: t.update(
        {k: v.to(torch.int32) for k, v in t.items() if "q_proj.lora_A" in k}))),
        "has dtype I32, not a float type")),
    "nan-in-every-lora-B": E(lambda e: (e.argv(adapter=e.copy_adapter(tensors=nan_b)),
                                        "every module was skipped (first: model.layers.0.self_attn"
                                        ".q_proj: the adapter's factors contain NaN or Inf)"),
                             warnings=True, subprocess=True),
    # corrupt safetensors (the adapter's)
    "safetensors-empty-file": E(lambda e: (
        e.argv(adapter=(a := adapter_with_header(e, raw=lambda b, d: b""))),
        f"{a / 'adapter_model.safetensors'}: not a safetensors file (shorter than 8 bytes)")),
    "safetensors-truncated": E(lambda e: (
        e.argv(adapter=(a := adapter_with_header(e, raw=lambda b, d: b[: len(b) - len(d) // 2]))),
        f"{a / 'adapter_model.safetensors'}: corrupt safetensors header: tensor")),
    "safetensors-header-longer-than-file": E(lambda e: (
        e.argv(adapter=(a := adapter_with_header(
            e, raw=lambda b, d: (len(b) + 1).to_bytes(8, "little") + b[8:]))),
        f"{a / 'adapter_model.safetensors'}: corrupt safetensors header (declares")),
    "safetensors-header-too-large": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, raw=lambda b, d: (1 << 40).to_bytes(8, "little")
                                           + b[8:])), "declares 1099511627776 header bytes")),
    "safetensors-header-not-json": E(lambda e: (
        e.argv(adapter=adapter_with_header(
            e, raw=lambda b, d: (10).to_bytes(8, "little") + b"{not json!" + d)),
        "corrupt safetensors header (not JSON")),
    "safetensors-header-not-an-object": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, raw=lambda b, d: (2).to_bytes(8, "little") + b"[]")),
        "corrupt safetensors header (not a JSON object)")),
    "safetensors-offsets-outside-the-file": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, lambda h: h[lora_entries(h)[0]].update(
            data_offsets=[h[lora_entries(h)[0]]["data_offsets"][0], 10**9]))),
        "lies outside the file"), subprocess=True),
    "safetensors-offsets-overlap": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, lambda h: h[
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].update(
            data_offsets=h["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][
                "data_offsets"]))), "overlaps")),
    "safetensors-unknown-dtype": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, lambda h: h[lora_entries(h)[0]].update(dtype="F33"))),
        "has unknown dtype 'F33'")),
    "safetensors-shape-disagrees-with-offsets": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, lambda h: h[lora_entries(h)[0]].update(
            shape=[4, 33]))), "bytes for shape [4, 33] of F32")),
    "safetensors-absurd-tensor-size": E(lambda e: (
        e.argv(adapter=adapter_with_header(e, lambda h: h[lora_entries(h)[0]].update(
            shape=[1 << 30, 1 << 30]))), "declares 4611686018427387904 bytes")),
    # base models
    "hub-id-not-cached-offline": E(lambda e: (
        e.argv(src="acme/not-cached-model"),
        "source model acme/not-cached-model: not a local folder, and not available from the hub"),
        subprocess=True, in_process=False),
    "source-model-missing": E(lambda e: (e.argv(src=e.inputs / "gone"),
                                         f"source model {e.inputs / 'gone'}: no such folder")),
    "target-model-is-a-file": E(lambda e: (e.argv(tgt=e.model / "config.json"),
                                           f"target model {e.model / 'config.json'} is a file")),
    "source-model-config-missing": E(lambda e: (
        e.argv(src=(m := edited(e.copy_model(), "config.json", None))),
        f"source model: {m / 'config.json'} not found")),
    "source-model-config-invalid-json": E(lambda e: (
        e.argv(src=(m := edited(e.copy_model(), "config.json", "{"))),
        f"source model: {m / 'config.json'} is not valid JSON")),
    "model-config-field-wrong-type": E(lambda e: (
        e.argv(tgt=e.copy_model(lambda c: c.update(hidden_size="32"))),
        "target model config: hidden_size must be a positive integer")),
    "model-config-absurd-layer-count": E(lambda e: (
        e.argv(src=e.copy_model(lambda c: c.update(num_hidden_layers=10**9))),
        "says num_hidden_layers=1000000000, but the checkpoint has only")),
    "model-index-weight-map-not-names": E(lambda e: (
        e.argv(tgt=(m := bad_index(e))),
        f"{m / 'model.safetensors.index.json'}: weight_map must map names to file names")),
    "model-only-pytorch-model-bin": E(lambda e: (
        e.argv(src=only_pickle_model(e)), "found only pickle weights pytorch_model.bin")),
    "model-type-unknown": E(lambda e: (
        e.argv(tgt=e.copy_model(lambda c: c.update(model_type="mamba"))),
        "model_type 'mamba' is not supported")),
    "model-type-not-a-string": E(lambda e: (
        e.argv(tgt=e.copy_model(lambda c: c.update(model_type=["llama"]))),
        "has no model_type string (got ['llama'])")),
    "model-safetensors-truncated": E(lambda e: (
        e.argv(src=(m := truncated_model(e))),
        f"{m / 'model.safetensors'}: corrupt safetensors header: tensor")),
    "model-shard-missing": E(lambda e: (
        e.argv(tgt=(m := sharded_with_missing_shard(e))),
        f"{m / 'model-00002-of-00002.safetensors'}: cannot read: No such file or directory")),
    "inf-in-every-source-weight": E(lambda e: (
        e.argv(src=e.copy_model(tensors=inf_in_every_weight), method="cross-lora"),
        "every module was skipped (first: model.layers.0.self_attn.q_proj: base weight "
        "model.layers.0.self_attn.q_proj contains NaN or Inf)"), warnings=True),
    "adapter-for-another-model": E(lambda e: (
        e.argv(src=e.tiny_model("qwen2")),
        "adapter does not fit the source model: model.layers.0.mlp.down_proj has ΔW shape "
        "(32, 64), the source weight is (40, 72)")),
    # files that are not regular files (a FIFO blocks its reader, /dev/zero never ends)
    "model-weights-fifo": E(lambda e: (
        e.argv(src=(m := fifo(e, e.copy_model(), "model.safetensors"))),
        f"source model: {m / 'model.safetensors'} is a FIFO, not a regular file"),
        subprocess=True),
    "model-config-fifo": E(lambda e: (
        e.argv(tgt=(m := fifo(e, e.copy_model(), "config.json"))),
        f"target model: {m / 'config.json'} is a FIFO, not a regular file")),
    "model-tokenizer-fifo-for-anchored": E(lambda e: (
        e.argv(tgt=(m := fifo(e, e.copy_model(), "tokenizer.json")), method="anchored"),
        f"target model: {m / 'tokenizer.json'} is a FIFO, not a regular file")),
    "model-weights-symlink-to-dev-zero": E(lambda e: (
        e.argv(src=(m := dev_zero(e.copy_model(), "model.safetensors"))),
        f"{m / 'model.safetensors'} is a character device, not a regular file")),
    "adapter-weights-fifo": E(lambda e: (
        e.argv(adapter=(a := fifo(e, e.copy_adapter(), WEIGHTS))),
        f"{a / WEIGHTS}: cannot read: a FIFO, not a regular file")),
    "adapter-config-fifo": E(lambda e: (
        e.argv(adapter=(a := fifo(e, e.copy_adapter(), CONFIG))),
        f"adapter config: cannot read {a / CONFIG}: a FIFO, not a regular file")),
    "adapter-weights-symlink-to-dev-zero": E(lambda e: (
        e.argv(adapter=(a := dev_zero(e.copy_adapter(), WEIGHTS))),
        f"{a / WEIGHTS}: cannot read: a character device, not a regular file")),
    "adapter-pickle-fifo": E(lambda e: (
        e.argv(fifo(e, pickle_adapter(e.adapter, e.inputs / "pickled", {}), "adapter_model.bin"), None, None, None, "copy",
               "--allow-pickle"),
        "adapter_model.bin: cannot read: a FIFO, not a regular file")),
    # models without weights, empty or integer weights, layer counts that disagree
    "model-config-without-weights": E(lambda e: (
        e.argv(src=(m := no_weights_model(e))),
        f"source model: no model.safetensors in {m} (the folder has a config.json and no "
        "weights)")),
    "model-weight-zero-rows": E(lambda e: (
        e.argv(src=e.copy_model(tensors=weight("self_attn.q_proj", lambda w: w[:0]))),
        "source model: model.layers.0.self_attn.q_proj.weight has shape (0, 32), an empty "
        "matrix")),
    "model-weight-zero-columns-in-the-target": E(lambda e: (
        e.argv(tgt=e.copy_model(tensors=weight("self_attn.k_proj", lambda w: w[:, :0]))),
        "target model: model.layers.0.self_attn.k_proj.weight has shape (16, 0), an empty "
        "matrix")),
    "model-integer-weights": E(lambda e: (
        e.argv(src=e.copy_model(tensors=weight("mlp.up_proj", lambda w: w.to(torch.int32))),
               method="crop-pad"),
        "source model: model.layers.0.mlp.up_proj.weight has dtype I32, not a float type")),
    "model-uint8-weights-in-the-target": E(lambda e: (
        e.argv(tgt=e.copy_model(tensors=weight("self_attn.o_proj", lambda w: w.to(torch.uint8)))),
        "target model: model.layers.0.self_attn.o_proj.weight has dtype U8, not a float type")),
    "model-config-fewer-layers-than-the-weights": E(lambda e: (
        e.argv(src=(m := e.copy_model(lambda c: c.update(num_hidden_layers=1)))),
        f"source model: {m / 'config.json'} says num_hidden_layers=1, but its weights have 2 "
        "layers (0-1)")),
    "model-config-more-layers-than-the-weights": E(lambda e: (
        e.argv(tgt=(m := e.copy_model(lambda c: c.update(num_hidden_layers=3)))),
        f"target model: {m / 'config.json'} says num_hidden_layers=3, but its weights have 2 "
        "layers (0-1)")),
    "target-model-folder-name-not-utf8": E(lambda e: (
        e.argv(tgt=not_utf8(e, e.model, b"model\xfe")),
        f"target model {e.inputs}/model\\xfe: the path is not valid UTF-8")),
    # adapter config values the output copies, names it records
    "config-task-type-unknown": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(task_type="CAUSAL_LMX"))),
        "task_type 'CAUSAL_LMX' is not a PEFT task type (one of SEQ_CLS,")),
    "config-lone-surrogate-in-a-field": E(lambda e: (
        e.argv(adapter=(a := raw_config(e, lambda t: t.replace(
            '"task_type": null', '"task_type": "\\ud800"')))),
        f"adapter config: {a / CONFIG}: field 'task_type' ('\\ud800') is not Unicode text")),
    "config-lone-surrogate-in-a-key": E(lambda e: (
        e.argv(adapter=raw_config(e, lambda t: t.replace(
            '"rank_pattern": {}', '"rank_pattern": {"q_\\udc00": 2}'))),
        "key 'q_\\udc00' of field 'rank_pattern' is not Unicode text")),
    "adapter-folder-name-not-utf8": E(lambda e: (
        e.argv(adapter=not_utf8(e, e.adapter, b"ad\xff")),
        f"adapter {e.inputs}/ad\\xff: the path is not valid UTF-8, and the output records it")),
    "config-lora-alpha-zero": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(lora_alpha=0))),
        "adapter config: lora_alpha must be positive, got 0")),
    "config-lora-alpha-negative": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(lora_alpha=-8))),
        "adapter config: lora_alpha must be positive, got -8")),
    # patterns that backtrack catastrophically (re cannot be interrupted: bounded in io/patterns)
    "rank-pattern-catastrophic-backtracking": E(lambda e: (
        e.argv(adapter=slow_pattern(e, rank_pattern={"q_proj": 4, SLOW: 2})),
        f"adapter config: rank_pattern key '{SLOW}' did not finish matching module "
        "'model.layers.0.mlp.down_proj' in 1 s")),
    "alpha-pattern-catastrophic-backtracking": E(lambda e: (
        e.argv(adapter=slow_pattern(e, alpha_pattern={SLOW: 2})),
        f"adapter config: alpha_pattern key '{SLOW}' did not finish matching module")),
    "target-modules-regex-catastrophic-backtracking": E(lambda e: (
        e.argv(adapter=slow_pattern(e, target_modules=SLOW)),
        f"adapter config: target_modules '{SLOW}' did not finish matching module")),
    "rank-pattern-key-fails-as-peft-runs-it": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(rank_pattern={"(?i)q_proj": 4}))),
        "adapter config: rank_pattern key '(?i)q_proj' is not a regex")),
    # an adapter that names layers the source lacks; layers_to_transform
    "adapter-layers-beyond-the-source": E(lambda e: (
        e.argv(adapter=extra_layer_adapter(e)),
        "adapter key base_model.model.model.layers.5.mlp.down_proj.lora_A.weight: layer 5 is "
        "beyond the source model's 2 layers (0-1)")),
    "layers-to-transform-out-of-range": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(layers_to_transform=[0, 1, 5]))),
        "adapter config: layers_to_transform names layer 5, outside the source model's layers "
        "0-1")),
    "layers-to-transform-int-out-of-range": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(layers_to_transform=2))),
        "layers_to_transform names layer 2, outside the source model's layers 0-1")),
    "layers-to-transform-negative": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(layers_to_transform=-1))),
        "adapter config: layers_to_transform must be >= 0, got -1")),
    "layers-to-transform-leaves-out-an-adapted-layer": E(lambda e: (
        e.argv(adapter=e.copy_adapter(lambda c: c.update(layers_to_transform=[1]))),
        "adapter module model.layers.0.mlp.down_proj has weights, but its layer 0 is not in "
        "layers_to_transform (1)")),
    # the source is the target: the adapter already fits (only --method copy may copy it)
    "same-model-cross-lora": E(lambda e: (
        e.argv(method="cross-lora"), f"{SAME} ({e.model}): {ALREADY}"), subprocess=True),
    "same-model-through-a-symlink": E(lambda e: (
        e.argv(tgt=(t := linked_model(e, "symlink")), method="anchored"),
        f"{SAME} ({e.model} and {t}): {ALREADY}")),
    "same-weights-file-hard-linked": E(lambda e: (
        e.argv(src=(s := linked_model(e, "hardlink")), method="crop-pad"),
        f"{SAME} ({s} and {e.model}): {ALREADY}")),
    "same-model-lora-x": E(lambda e: (e.argv(method="lora-x"), f"{SAME} ({e.model})")),
    # output path
    "output-parent-missing-is-not-created": E(lambda e: (
        e.argv(adapter=e.inputs / "nope", out=e.work / "new" / "sub" / "out"),
        f"adapter {e.inputs / 'nope'}: no such folder")),
    "output-path-is-a-file": E(lambda e: (
        e.out.write_text("keep me"), e.argv(), f"output path {e.out} is a file")[1:]),
    "output-folder-not-empty": E(lambda e: (
        e.out.mkdir(), (e.out / "x").write_text("keep me"), e.argv(),
        f"output folder {e.out} is not empty (pass --overwrite")[2:]),
    "output-parent-is-a-file": E(lambda e: (
        (e.work / "afile").write_text("x"), e.argv(out=e.work / "afile" / "sub" / "out"),
        f"{e.work / 'afile'} is a file, not a folder")[1:]),
    "output-parent-no-permission": E(lambda e: (
        e.argv(out=locked_folder(e) / "out"), f"no permission to write in {e.work / 'locked'}")),
    "output-under-proc": E(lambda e: (
        e.argv(out=Path("/proc/crosslora-test-out")), "write in /proc")),
    "output-read-only-mount": E(lambda e: (
        e.argv(out=(ro := e.mount_tmpfs("ro", "ro,size=64k")) / "out"),
        f"cannot write in {ro}: Read-only file system")),
    "output-disk-full": E(lambda e: (
        e.argv(out=(full := e.mount_tmpfs("full", "size=8k")) / "out"),
        f"cannot write {full / 'out'}: No space left on device")),
    "output-float16-overflow": E(lambda e: (
        e.argv(e.copy_adapter(tensors=lambda t: t.update(
            {k: v * 1e6 for k, v in t.items() if "lora_B" in k})), None, None, None, "copy",
            "--dtype", "float16"),
        "lora_B does not fit in float16")),
    # command line
    "truncation-rank-zero": E(lambda e: (
        e.argv(method="cross-lora") + ["--truncation-rank", "0"],
        "argument --truncation-rank: expected a positive integer or 'full', got '0'")),
    "truncation-rank-negative": E(lambda e: (
        e.argv(method="cross-lora") + ["--truncation-rank", "-3"],
        "argument --truncation-rank: expected a positive integer or 'full', got '-3'")),
    "truncation-rank-not-an-integer": E(lambda e: (
        e.argv(method="cross-lora") + ["--truncation-rank", "2.5"],
        "argument --truncation-rank: expected a positive integer or 'full', got '2.5'")),
    "device-cuda-without-cuda": E(lambda e: (
        no_cuda() or e.argv() + ["--device", "cuda"], "--device cuda: CUDA is not available")),
    "device-cuda-index-out-of-range": E(lambda e: (e.argv() + ["--device", "cuda:99"],
                                                   "--device cuda:99: ")),
    "device-unknown": E(lambda e: (e.argv() + ["--device", "tpu9"], "--device tpu9: not a device")),
    "device-meta": E(lambda e: (e.argv() + ["--device", "meta"], "--device meta: not supported")),
    "dtype-invalid": E(lambda e: (e.argv() + ["--dtype", "float64"],
                                  "argument --dtype: invalid choice: 'float64'")),
    "method-unknown": E(lambda e: (e.argv(method="magic"),
                                   "argument --method: invalid choice: 'magic'"),
                        subprocess=True),
    "required-option-missing": E(lambda e: (without(e.argv(), "--adapter"),
                                            "the following arguments are required: --adapter")),
    "unknown-option": E(lambda e: (e.argv() + ["--trust-remote-code"],
                                   "unrecognized arguments: --trust-remote-code")),
}  # fmt: skip


# --- running and checking -------------------------------------------------------------------------


def staging_leftovers(out: Path) -> list[str]:
    parent = out.parent
    with contextlib.suppress(OSError):
        return [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return []


def out_of(argv: list[str]) -> Path:
    return (
        Path(argv[argv.index("--out-path") + 1]) if "--out-path" in argv else Path("/nonexistent")
    )


def check_failure(code: int, err: str, case: Case, fragment: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("crosslora: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    others = lines[:-1]
    if case.warnings:
        assert others and all(line.startswith("warning: ") for line in others), others
    else:
        assert not others, lines
    assert fragment in errors[0], (fragment, errors[0])
    assert code == 2, (code, errors[0])
    return errors[0]


@pytest.fixture
def env(tmp_path, tiny_model, tiny_adapter):
    with contextlib.ExitStack() as stack:
        yield Env(tmp_path, tiny_model, tiny_adapter, stack)


OUTCOMES: dict[str, str] = {}  # case -> the error line (CROSSLORA_OUTCOMES=1 prints them)
BY_SUBPROCESS: dict[str, str] = {}  # the same, through the console script


@pytest.fixture(scope="module", autouse=True)
def outcomes_table(request):
    """With CROSSLORA_OUTCOMES=1, how each table case that ran here ended, printed once this
    module's tests are done (a report, not a test: each case checks its own line)."""
    yield
    if not os.environ.get("CROSSLORA_OUTCOMES"):
        return

    def table(outcomes: dict[str, str]) -> list[str]:
        return [f"  {n:<40} exit 2  {v.removeprefix('crosslora: error: ')}"
                for n, v in outcomes.items()]  # fmt: skip

    lines = [f"{len(OUTCOMES)} of {len(CASES)} table cases ran in-process:", *table(OUTCOMES),
             f"{len(BY_SUBPROCESS)} through the console script:", *table(BY_SUBPROCESS)]  # fmt: skip
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.in_process])
def test_bad_input_fails_in_one_line_and_writes_nothing(name, env, capsys):
    case = CASES[name]
    argv, fragment = case.build(env)
    out = out_of(argv)
    before = snapshot(env.work)
    out_before = snapshot(out) if out.is_dir() else out.read_bytes() if out.is_file() else None
    capsys.readouterr()
    code = main([*argv, "-q"])
    captured = capsys.readouterr()
    assert captured.out == ""
    line = check_failure(code, captured.err, case, fragment)
    OUTCOMES[name] = line
    # nothing written: the work folder is as it was, the output path too, no staging leftovers
    assert snapshot(env.work) == before
    assert (snapshot(out) if out.is_dir() else out.read_bytes() if out.is_file() else None) == (
        out_before
    )
    assert staging_leftovers(out) == []


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30
    assert sum(c.subprocess for c in CASES.values()) >= 5


def test_bad_inputs_through_the_console_script(tmp_path, tiny_model, tiny_adapter):
    """The real entry point, one process per case (run side by side): the same single line on
    stderr, no traceback, no library noise. One case goes through ``python -m crosslora``."""
    names = [n for n, c in CASES.items() if c.subprocess]
    runs = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            env = Env(tmp_path / name, tiny_model, tiny_adapter, stack)
            argv, fragment = CASES[name].build(env)
            cmd = [str(CLI)] if CLI.exists() and name != "method-unknown" else [
                sys.executable, "-m", "crosslora"]  # fmt: skip
            offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(env.tmp / "hub")}
            proc = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE,
                                    env={**os.environ, **offline, "PYTHONPATH": str(SRC)})  # fmt: skip
            stack.callback(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))
            runs[name] = (proc, argv, fragment)
        for name, (proc, argv, fragment) in runs.items():
            stdout, stderr = (b.decode() for b in proc.communicate(timeout=300))  # keep \r
            case = CASES[name]
            assert stdout == "", (name, stdout)
            visible = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]  # as a terminal
            err = "\n".join(line for line in visible if not _progress(line))
            BY_SUBPROCESS[name] = check_failure(proc.returncode, err, case, fragment)
            out = out_of(argv)
            assert not out.exists() or name == "output-path-is-a-file", name
            assert staging_leftovers(out) == [], name


def _progress(line: str) -> bool:
    """A tqdm progress-bar line (the subprocess runs without -q, as a user would)."""
    return bool(re.match(r"^transfer \([\w-]+\): +\d+%\|", line))


def test_verbose_shows_the_traceback(env, capsys):
    """-v is the one way to get a traceback for a user error."""
    capsys.readouterr()
    assert main([*env.argv(adapter=env.inputs / "nope"), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("crosslora: error: ")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_one_line_without_a_mount(env, capsys, monkeypatch):
    """The full disk again, simulated, as the weights file is written."""
    import crosslora.io.peft_adapter

    monkeypatch.setattr(crosslora.io.peft_adapter, "write_safetensors", _disk_full)
    capsys.readouterr()
    assert main([*env.argv(), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crosslora: error: cannot write {env.out}: {os.strerror(errno.ENOSPC)}"]
    assert not env.out.exists() and staging_leftovers(env.out) == []


def test_disk_full_keeps_the_previous_output(env, capsys, monkeypatch):
    """With --overwrite, a failed write leaves the previous output exactly as it was."""
    assert main([*env.argv(), "-q"]) == 0
    before = snapshot(env.out)
    import crosslora.io.peft_adapter

    monkeypatch.setattr(crosslora.io.peft_adapter, "write_safetensors", _disk_full)
    capsys.readouterr()
    assert main([*env.argv(), "-q", "--overwrite"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert snapshot(env.out) == before and staging_leftovers(env.out) == []


# --- NaN / Inf in one module: skipped with a warning, the rest written, nothing non-finite ------


def _all_finite(folder: Path) -> bool:
    return all(
        torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values()
    )


def test_nan_in_one_module_skips_it_with_a_warning(env, capsys):
    bad = "model.layers.1.self_attn.v_proj"
    ad = env.copy_adapter(tensors=lambda t: nan_b(t, lambda k: f".{bad}." in k))
    capsys.readouterr()
    assert main([*env.argv(adapter=ad), "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping {bad}: the adapter's factors contain NaN or Inf"]
    written = load_file(env.out / "adapter_model.safetensors")
    assert _all_finite(env.out) and len(written) == 2 * 13
    assert not any(bad in k for k in written)
    report = json.loads((env.out / "transfer_report.json").read_text())
    assert "NaN" in json.dumps(report)  # the skip and its reason are in the report


def test_inf_in_one_base_weight_skips_that_module(env, capsys):
    key = "model.layers.0.mlp.gate_proj.weight"

    def poison(ts: dict) -> None:
        ts[key] = ts[key].clone()
        ts[key][3, 5] = float("-inf")

    tgt = env.copy_model(tensors=poison)
    capsys.readouterr()
    assert main([*env.argv(tgt=tgt, method="cross-lora"), "-q"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: skipping model.layers.0.mlp.gate_proj: base weight "
                   "model.layers.0.mlp.gate_proj contains NaN or Inf",
                   f"warning: {expectation('cross-lora')[0]}"]  # fmt: skip
    written = load_file(env.out / "adapter_model.safetensors")
    assert _all_finite(env.out) and not any("layers.0.mlp.gate_proj" in k for k in written)


# --- security -----------------------------------------------------------------------------------


def test_no_remote_code_anywhere():
    """trust_remote_code is never turned on, and no command has an option to turn it on."""
    import argparse

    from crosslora.cli import build_parser

    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*(?!False)", text), path
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in commands.choices.items():
        assert "remote" not in sub.format_help(), name
