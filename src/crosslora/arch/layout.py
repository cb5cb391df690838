"""Architectures as data: which modules a layer has, the canonical roles they hold, their spaces.

A *family* file (``families/<name>.json``) names each adapted module of a layer, relative to the
layer prefix, with the canonical roles it holds (``q k v o gate up down``). A fused module holds
several roles in row blocks of its output: ``contiguous`` (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``)
or ``heads_interleaved`` (GPT-NeoX ``query_key_value``: per head, q then k then v rows).
GPT-2 stores Conv1D weights as (in, out); ``conv1d: true`` says so.

Optional fields, for models whose decoder is one part of a larger model or whose MLP is not dense:

- ``text_config``: the config's sub-object that holds the decoder's sizes (Gemma 3 multimodal:
  ``text_config``); else the config's top level.
- ``config_defaults``: the sizes that config may leave out, with the values transformers' config
  class gives them (the hub's Gemma 3 4B ``text_config`` names no head counts, head_dim or vocab).
- ``checkpoint_prefixes``: ``{module-path prefix: checkpoint-key prefix}`` that weight look-ups
  also try (Gemma 3 multimodal checkpoints store ``model.language_model.X`` as
  ``language_model.model.X``).
- ``not_transferred``: ``{regex: reason}``: an adapter module whose path the regex finds
  (``re.search``) is skipped with that reason (a vision tower, mixture-of-experts experts and
  routers); a written adapter excludes the target's such modules (PEFT ``exclude_modules``), whose
  names may repeat the decoder's (``q_proj`` in a vision tower).
- ``absent_roles``: ``{role: reason}``: why a layer may lack a role (a mixture-of-experts MLP has
  no dense ``gate``/``up``/``down``), said where a transfer's target lacks it.

Every role reads one named space and writes another (``ROLE_SPACES``); those are the spaces a
transfer must map between the two models.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint
from crosslora.layer_map import ranges

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' spelling

# role -> (space it reads, space it writes)
ROLE_SPACES: dict[str, tuple[str, str]] = {
    "q": ("residual", "q_heads"),
    "k": ("residual", "k_heads"),
    "v": ("residual", "v_heads"),
    "o": ("attn_out", "residual"),
    "gate": ("residual", "mlp"),
    "up": ("residual", "mlp"),
    "down": ("mlp", "residual"),
}


@dataclass(frozen=True)
class Family:
    """One family file, parsed."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # layer container path, e.g. "model.layers"
    modules: dict[str, tuple[tuple[str, ...], str | None]]  # suffix -> (roles, split kind)
    conv1d: bool
    data: dict  # the whole file, for fields that later methods read (norms, embeddings)


@cache
def families() -> dict[str, Family]:
    """All known families, keyed by ``model_type``."""
    out: dict[str, Family] = {}
    for entry in sorted(resources.files("crosslora.arch").joinpath("families").iterdir()):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        modules = {}
        for suffix, spec in data["modules"].items():
            if isinstance(spec, list):
                modules[suffix] = (tuple(spec), None)
            else:
                modules[suffix] = (tuple(spec["roles"]), spec["split"])
        fam = Family(
            entry.name.removesuffix(".json"), tuple(data["model_types"]), data["layers"],
            modules, bool(data.get("conv1d", False)), data,
        )  # fmt: skip
        for model_type in fam.model_types:
            out[model_type] = fam
    return out


def family_for(model_type: str | None, what: str) -> Family:
    known = families()
    if not isinstance(model_type, str) or model_type not in known:
        raise CrossLoraError(
            f"{what}: model_type {model_type!r} is not supported; supported: "
            + ", ".join(sorted(known))
        )
    return known[model_type]


@dataclass(frozen=True)
class Dims:
    """The sizes a layout needs, read from a Hugging Face config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def decoder_config(config: dict, family: Family, what: str) -> dict:
    """The part of a model's config that sizes its decoder: the family's ``text_config``
    sub-object (a multimodal model's text tower), else the whole config."""
    sub = family.data.get("text_config")
    inner = config if sub is None else config.get(sub)
    if not isinstance(inner, dict):
        raise CrossLoraError(f"{what} config: missing {sub} (the text decoder's config)")
    defaults = family.data.get("config_defaults", {})
    return {**defaults, **{k: v for k, v in inner.items() if v is not None or k not in defaults}}


def read_dims(config: dict, what: str) -> Dims:
    def get(*names: str, default: int | None = None) -> int:
        for name in names:
            value = config.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise CrossLoraError(f"{what} config: {name} must be a positive integer")
                return value
        if default is None:
            raise CrossLoraError(f"{what} config: missing {names[0]}")
        return default

    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    return Dims(
        hidden=hidden,
        layers=get("num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
        vocab=get("vocab_size"),
    )


@dataclass(frozen=True)
class Slot:
    """One module of one layer as the model names it; ``rows`` locate each role in its output."""

    module: str  # full module path, e.g. "model.layers.3.self_attn.qkv_proj"
    layer: int
    roles: tuple[str, ...]
    rows: dict[str, torch.Tensor | None]  # role -> LongTensor of output rows (None: all rows)
    conv1d: bool
    out_features: int


@dataclass(frozen=True)
class RoleRef:
    """One canonical role of one layer: where it lives and the (out, in) shape of its weight."""

    layer: int
    role: str
    slot: Slot
    shape: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.slot.module}" + (f"[{self.role}]" if len(self.slot.roles) > 1 else "")


class Layout:
    """A model's adapted modules, per layer and role, checked against its checkpoint's shapes."""

    def __init__(self, checkpoint: Checkpoint, what: str) -> None:
        self.checkpoint = checkpoint
        self.what = what
        if "auto_map" in checkpoint.config and checkpoint.model_type not in families():
            from crosslora.io.pretrained import remote_code_message

            detail = f"model_type {checkpoint.model_type!r}, auto_map in config.json"
            raise CrossLoraError(remote_code_message(checkpoint.path, what, detail))
        self.family = family_for(checkpoint.model_type, what)
        checkpoint.prefix_aliases = tuple(self.family.data.get("checkpoint_prefixes", {}).items())
        self.config = decoder_config(checkpoint.config, self.family, what)
        self.dims = read_dims(self.config, what)
        self._not_transferred = [
            (re.compile(pattern), reason)
            for pattern, reason in self.family.data.get("not_transferred", {}).items()
        ]
        self._check_layer_count()
        leaf = re.escape(self.family.layers.split(".")[-1])
        suffixes = "|".join(re.escape(s) for s in self.family.modules)
        self._module_re = re.compile(rf"(?:^|.*\.){leaf}\.(\d+)\.({suffixes})$")
        self._roles: dict[tuple[int, str], RoleRef] = {}
        for layer in range(self.dims.layers):
            for suffix in self.family.modules:
                self._add_slot(layer, suffix)

    def _check_layer_count(self) -> None:
        """The config's layer count must be the weights': layers 0..n-1 under the family's layer
        container (``model.layers.N.``, or ``layers.N.`` in a bare model's checkpoint). Fewer in
        the config would silently leave the later layers (and their adapter) out; more would
        leave layers without weights."""
        paths = [self.family.layers] + [
            stored + self.family.layers[len(prefix) :]
            for prefix, stored in self.checkpoint.prefix_aliases
            if self.family.layers.startswith(prefix)
        ]
        suffixes = {".".join(parts[i:]) for p in paths for parts in [p.split(".")]
                    for i in range(len(parts))}  # fmt: skip
        prefixes = "|".join(re.escape(x) for x in sorted(suffixes, key=len, reverse=True))
        layer_key = re.compile(rf"(?:{prefixes})\.(\d+)\.")
        found = {int(m[1]) for key in self.checkpoint.keys() if (m := layer_key.match(key))}
        n = self.dims.layers
        if found == set(range(n)):
            return
        config = self.config
        field_name = next((k for k in ("num_hidden_layers", "n_layer") if config.get(k)), "layers")
        have = (
            f"{len(found)} layers ({ranges(sorted(found))})"
            if found
            else f"no {self.family.layers}.N tensors"
        )
        raise CrossLoraError(
            f"{self.what}: {self.checkpoint.path / 'config.json'} says {field_name}={n}, but its "
            f"weights have {have}"
        )

    @property
    def num_layers(self) -> int:
        return self.dims.layers

    def module_path(self, layer: int, suffix: str) -> str:
        return f"{self.family.layers}.{layer}.{suffix}"

    def _add_slot(self, layer: int, suffix: str) -> None:
        roles, split = self.family.modules[suffix]
        module = self.module_path(layer, suffix)
        key = self.checkpoint.find(module)
        if key is None:
            return  # a layer without this module (e.g. cross-attention-only); nothing to adapt
        shape = self.checkpoint.shape(key)
        if len(shape) != 2:
            raise CrossLoraError(f"{self.what}: {key} has shape {shape}, expected a matrix")
        if 0 in shape:
            raise CrossLoraError(f"{self.what}: {key} has shape {shape}, an empty matrix")
        dtype = self.checkpoint.dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise CrossLoraError(
                f"{self.what}: {key} has dtype {dtype}, not a float type (a quantized "
                "checkpoint? use the model's unquantized weights)"
            )
        out_f, in_f = (shape[1], shape[0]) if self.family.conv1d else shape
        rows = self._split_rows(roles, split, out_f, module)
        slot = Slot(module, layer, roles, rows, self.family.conv1d, out_f)
        for role in roles:
            n = out_f if rows[role] is None else len(rows[role])
            self._roles[(layer, role)] = RoleRef(layer, role, slot, (n, in_f))

    def _split_rows(
        self, roles: tuple[str, ...], split: str | None, out_f: int, module: str
    ) -> dict[str, torch.Tensor | None]:
        if split is None:
            return {roles[0]: None}
        d = self.dims
        kv = d.kv_heads * d.head_dim
        sizes = {"q": d.heads * d.head_dim, "k": kv, "v": kv, "gate": d.intermediate,
                 "up": d.intermediate}  # fmt: skip
        if sum(sizes[r] for r in roles) != out_f:
            raise CrossLoraError(
                f"{self.what}: fused {module} has {out_f} output rows, but the config implies "
                + " + ".join(f"{sizes[r]} ({r})" for r in roles)
            )
        if split == "contiguous":
            bounds, start = {}, 0
            for role in roles:
                bounds[role] = torch.arange(start, start + sizes[role])
                start += sizes[role]
            return bounds
        if split == "heads_interleaved":  # GPT-NeoX: view(..., heads, 3 * head_dim)
            hd, per_head = d.head_dim, len(roles) * d.head_dim
            base = torch.arange(d.heads)[:, None] * per_head + torch.arange(hd)[None, :]
            return {role: (base + i * hd).reshape(-1) for i, role in enumerate(roles)}
        raise CrossLoraError(f"family {self.family.name}: unknown split {split!r}")

    def role(self, layer: int, role: str) -> RoleRef | None:
        return self._roles.get((layer, role))

    def roles(self) -> list[RoleRef]:
        return list(self._roles.values())

    def parse_module(self, module: str) -> tuple[int, str] | None:
        """``(layer, suffix)`` of an adapter's module name, whatever its prefix; None if foreign,
        or if the family does not transfer it (``skip_reason``)."""
        if self.skip_reason(module) is not None:
            return None
        m = self._module_re.match(module)
        return (int(m[1]), m[2]) if m else None

    def skip_reason(self, module: str) -> str | None:
        """Why the family does not transfer an adapter's module (``not_transferred``), else None."""
        return next((why for rx, why in self._not_transferred if rx.search(module)), None)

    def absent_reason(self, role: str) -> str | None:
        """Why a layer of this family may lack ``role`` (``absent_roles``), else None."""
        return self.family.data.get("absent_roles", {}).get(role)

    def exclude_modules(self) -> str | None:
        """A PEFT ``exclude_modules`` regex (``re.fullmatch``) for the modules the family does not
        transfer into, or None: a written adapter's ``target_modules`` list names leaves such as
        ``q_proj``, which a vision tower's modules share."""
        patterns = list(self.family.data.get("not_transferred", {}))
        return "|".join(f".*(?:{p}).*" for p in patterns) if patterns else None

    def slot_roles(self, layer: int, suffix: str) -> list[RoleRef]:
        roles, _ = self.family.modules[suffix]
        return [ref for r in roles if (ref := self.role(layer, r)) is not None]

    def weight(self, ref: RoleRef, device: torch.device | str = "cpu") -> torch.Tensor:
        """The role's base weight, float32 on ``device``, (out, in) orientation, its rows only."""
        key = self.checkpoint.find(ref.slot.module)
        assert key is not None
        w = self.checkpoint.get(key).to(device=device, dtype=torch.float32)
        if ref.slot.conv1d:
            w = w.T
        rows = ref.slot.rows[ref.role]
        return (w if rows is None else w[rows.to(w.device)]).contiguous()

    def norm_key(self, field: str, layer: int | None) -> str | None:
        """The checkpoint key of the norm a family field names (None where the family or
        checkpoint has no such norm); ``layer`` None: a model-level norm."""
        name = self.family.data.get(field)
        if not name:
            return None
        path = name if layer is None else f"{self.family.layers}.{layer}.{name}"
        return self.checkpoint.find(path)

    def norm_gain(self, field: str, layer: int | None) -> torch.Tensor | None:
        """The effective gain (γ, or 1 + γ for Gemma) of that norm, float64 (None where there is
        none)."""
        key = self.norm_key(field, layer)
        if key is None:
            return None
        return self.checkpoint.get(key).double() + float(self.family.data.get("norm_offset", 0.0))
