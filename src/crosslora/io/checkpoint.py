"""Base-model checkpoints: resolve a folder or hub id, read the config, read tensors lazily.

Only headers are read up front. A tensor is read when asked for, from its own shard, so memory
stays bounded by the tensors in use whatever the model's size.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.files import open_regular, special_kind
from crosslora.io.safetensors_file import TensorFile

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]  # config, weights, tokenizer


def resolve_local_or_hub(spec: str | os.PathLike[str], what: str) -> Path:
    """A local folder, or a hub id fetched (or found in the local hub cache when offline)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CrossLoraError(f"{what} {path} is a file; expected a folder")
        if not _encodes(str(path)):  # the output records it (report, model card, metadata)
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            raise CrossLoraError(
                f"{what} {shown}: the path is not valid UTF-8, and the output records it; "
                "rename the folder"
            )
        return path
    text = str(spec)
    if text.startswith((".", "/", "~")) or not HUB_ID.match(text) or text.count("/") > 1:
        raise CrossLoraError(f"{what} {text}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated, ...: one line either way
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CrossLoraError(
            f"{what} {text}: not a local folder, and not available from the hub or its local "
            f"cache ({msg})"
        ) from err


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object, with one-line errors naming the file."""
    try:
        with open_regular(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as err:
        raise CrossLoraError(f"{what}: {path} not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CrossLoraError(f"{what}: cannot read {path}: {err}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit number, nesting
        raise CrossLoraError(f"{what}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CrossLoraError(f"{what}: {path} must hold a JSON object")
    where = _lone_surrogate(data)
    if where is not None:
        raise CrossLoraError(
            f"{what}: {path}: {where} is not Unicode text (a lone surrogate: a \\uD800-\\uDFFF "
            "escape without its pair)"
        )
    return data


def _lone_surrogate(data: dict) -> str | None:
    """Where in a parsed JSON object a string or key is not Unicode text, else None.

    JSON text may spell half of a surrogate pair (``"\\ud800"``); Python parses it into a string
    that no encoder accepts, so it would fail wherever the value is written (after the work).
    """
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _encodes(value):
                return f"field {where} ({ascii(value)[:60]})"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodes(key):
                    return f"key {ascii(key)[:60]}" + (f" of field {where}" if where else "")
                stack.append((item, f"{where}[{key!r}]" if where else repr(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Checkpoint:
    """A Hugging Face model folder: ``config.json`` plus safetensors weights (single or sharded).

    ``get(name)`` reads one tensor; shapes come from headers alone (``shape(name)``).
    """

    def __init__(self, spec: str | os.PathLike[str], what: str = "model") -> None:
        self.spec = str(spec)
        self.path = resolve_local_or_hub(spec, what)
        self._refuse_special_files(what)
        self.config = read_json(self.path / "config.json", what)
        self.model_type = self.config.get("model_type")
        if not isinstance(self.model_type, str):
            raise CrossLoraError(
                f"{what}: {self.path / 'config.json'} has no model_type string "
                f"(got {self.model_type!r})"
            )
        self._shards: dict[str, TensorFile] = {}
        # (module-path prefix, checkpoint-key prefix) pairs that ``find`` also tries: where the
        # family's checkpoints store a tower under another name than its module path (set by
        # ``arch.layout.Layout`` from the family file)
        self.prefix_aliases: tuple[tuple[str, str], ...] = ()
        self.weight_map = self._weight_map(what)
        # every layer has at least one tensor: a larger layer count is a lying config (and would
        # make a layout walk billions of layers)
        for key in ("num_hidden_layers", "n_layer"):
            layers = self.config.get(key)
            if type(layers) is int and layers > len(self.weight_map):
                raise CrossLoraError(
                    f"{what}: {self.path / 'config.json'} says {key}={layers}, but the checkpoint "
                    f"has only {len(self.weight_map)} tensors"
                )

    def _weight_map(self, what: str) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, what).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CrossLoraError(f"{what}: {index} has no weight_map")
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise CrossLoraError(f"{what}: {index}: weight_map must map names to file names")
            for shard in sorted(set(weight_map.values())):
                self._open(shard)
            for name, shard in weight_map.items():
                if name not in self._shards[shard]:
                    raise CrossLoraError(f"{what}: {index} lists {name!r}, absent from {shard}")
            return dict(weight_map)
        single = self.path / "model.safetensors"
        if single.exists():
            return dict.fromkeys(self._open(single.name).keys(), single.name)
        pickles = sorted(p.name for p in self.path.glob("*.bin"))
        hint = (
            f" (found only pickle weights {pickles[0]}; convert them to safetensors)"
            if pickles
            else " (the folder has a config.json and no weights)"
        )
        raise CrossLoraError(f"{what}: no model.safetensors in {self.path}{hint}")

    def _refuse_special_files(self, what: str) -> None:
        """Every file of the folder must be a regular file (symlinks followed): a FIFO or a device
        named model.safetensors, config.json or tokenizer.json (read by crosslora, or by
        transformers for the methods that load tokenizers or models) would block or never end."""
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError:
            return  # reading config.json says what is wrong
        for entry in entries:
            try:
                mode = os.stat(entry.path).st_mode
            except OSError:
                continue  # a dangling link: whoever needs that file reports it missing
            kind = special_kind(mode)
            if kind:
                raise CrossLoraError(f"{what}: {entry.path} is {kind}, not a regular file")

    def _open(self, shard: str) -> TensorFile:
        if shard not in self._shards:
            if Path(shard).name != shard:
                raise CrossLoraError(f"shard name {shard!r} must be a plain file name")
            self._shards[shard] = TensorFile(self.path / shard)
        return self._shards[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shards[self.weight_map[name]].shape(name)

    def dtype(self, name: str) -> str:
        """Tensor ``name``'s dtype as safetensors spells it (``F32``, ``BF16``, ``I32``, ...)."""
        return self._shards[self.weight_map[name]].tensors[name].dtype

    def same_model(self, other: Checkpoint) -> bool:
        """The same folder (however reached), or the very same weights files (hard links, the hub
        cache's blobs): not a copy, which is another file."""
        if os.path.samefile(self.path, other.path):
            return True
        return self._file_ids() == other._file_ids()

    def _file_ids(self) -> frozenset[tuple[int, int]]:
        out = set()
        for shard in self._shards.values():
            st = os.stat(shard.path)
            out.add((st.st_dev, st.st_ino))
        return frozenset(out)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CrossLoraError(f"{self.path}: the checkpoint has no tensor {name!r}")
        return self._shards[self.weight_map[name]].get(name)

    def identity(self, name: str) -> dict:
        """What identifies tensor ``name``'s bytes without reading them: its shard file (resolved
        path, size, mtime_ns) and its header entry (dtype, shape, byte span). Any rewrite of the
        file changes at least the mtime."""
        shard = self._shards[self.weight_map[name]]
        path = shard.path.resolve()
        st = path.stat()
        info = shard.tensors[name]
        return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "tensor": name, "dtype": info.dtype, "shape": list(info.shape),
                "offsets": [info.start, info.end]}  # fmt: skip

    def shard_rank(self, name: str) -> int:
        """Position of tensor ``name``'s shard in file order (for reading shard by shard)."""
        return sorted(set(self.weight_map.values())).index(self.weight_map[name])

    def find(self, module_path: str, leaf: str = "weight") -> str | None:
        """The checkpoint key of ``<module_path>.<leaf>``, tolerating a missing or extra prefix.

        Checkpoints saved from a bare ``*Model`` lack the ``model.``/``transformer.`` prefix that a
        ``*ForCausalLM`` module path has (and old GPT-2 files lack ``transformer.``). The path as
        given is tried first, then through ``prefix_aliases`` (Gemma 3 multimodal checkpoints store
        the module ``model.language_model.X`` as ``language_model.model.X``).
        """
        paths = [module_path] + [
            stored + module_path[len(prefix) :]
            for prefix, stored in self.prefix_aliases
            if module_path.startswith(prefix)
        ]
        for path in paths:
            parts = path.split(".")
            for i in range(len(parts)):
                key = ".".join([*parts[i:], leaf])
                if key in self.weight_map:
                    return key
        return None
