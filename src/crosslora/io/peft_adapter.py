"""The PEFT LoRA contract, in one place: file names, key grammar, scale rule, config I/O.

PEFT saves an adapter as ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r). A
module's rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches its
name (PEFT's rule: ``re.match(rf"(.*\\.)?({pattern})$", name)``), else from ``r`` / ``lora_alpha``;
its scale is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. A written adapter uses neither
pattern (``write_adapter``): servers such as vLLM ignore them.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import HUB_ID, read_json, resolve_local_or_hub
from crosslora.io.files import open_regular
from crosslora.io.peft_config import module_patterns, read_adapter_config
from crosslora.io.safetensors_file import TensorFile, write_safetensors
from crosslora.io.spool import Spool
from crosslora.lora import LoraFactors

log = logging.getLogger("crosslora")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


def lora_key(module: str, which: str) -> str:
    """The saved key of a module's ``lora_A`` or ``lora_B`` weight."""
    return f"{KEY_PREFIX}{module}.lora_{which}.weight"


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class ModuleLora:
    """One adapted module of a source adapter: its keys, rank and scale."""

    module: str  # module path in the base model, e.g. "model.layers.3.self_attn.q_proj"
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    shape: tuple[int, int]  # (out, in) of ΔW


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk, validated; tensors are read on demand."""

    path: Path
    config: dict
    r: int
    lora_alpha: float
    use_rslora: bool
    modules: dict[str, ModuleLora]
    dtype: torch.dtype
    _tensors: TensorFile | dict[str, torch.Tensor] | None = None
    # modules whose LoRA PEFT put on a parameter (``target_parameters``: mixture-of-experts expert
    # tensors, routers), not on a Linear: listed for the plan to skip, not read
    parameter_modules: tuple[str, ...] = ()

    def tensor(self, key: str) -> torch.Tensor:
        assert self._tensors is not None
        return (
            self._tensors.get(key) if isinstance(self._tensors, TensorFile) else self._tensors[key]
        )

    def factors(self, module: str) -> LoraFactors:
        """The module's factors in their stored dtype; A (r, in), B (out, r)."""
        m = self.modules[module]
        return LoraFactors(self.tensor(m.a_key), self.tensor(m.b_key), m.scale)


def read_adapter(spec: str | os.PathLike[str], allow_pickle: bool = False) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (or hub id).

    Refuses non-LoRA PEFT types, DoRA, embedding LoRA and LoRA biases with one clear line;
    ignores ``modules_to_save`` tensors with a warning that names them. Pickle weights
    (``adapter_model.bin``) load only with ``allow_pickle``, through ``weights_only=True``.
    """
    path = resolve_local_or_hub(spec, "adapter")
    config = read_adapter_config(path / CONFIG_NAME)  # every field used below is validated there
    r = config.get("r", 8)
    lora_alpha = config.get("lora_alpha", 8)
    use_rslora = config.get("use_rslora", False)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    target_modules = config.get("target_modules")

    tensors = _open_weights(path, allow_pickle)
    keys = tensors.keys() if isinstance(tensors, TensorFile) else list(tensors)
    shapes = {k: _shape(tensors, k) for k in keys}
    dtypes = {_dtype(tensors, k) for k in keys}

    found: dict[str, dict[str, str]] = {}
    dropped: list[str] = []
    for key in keys:
        _refuse_unsupported(key)
        m = LORA_KEY.match(key)
        if m is None:
            dropped.append(key)
            continue
        found.setdefault(m["module"], {})[m["which"]] = key
    if dropped:
        saved = config.get("modules_to_save") or []
        log.warning(
            "warning: dropping %d adapter tensor(s) that are not LoRA factors%s: %s",
            len(dropped),
            f" (modules_to_save={saved})" if saved else "",
            ", ".join(dropped[:6]) + (" ..." if len(dropped) > 6 else ""),
        )
    if not found:
        raise CrossLoraError(f"adapter {path}: no LoRA tensors (lora_A/lora_B) in its weights")

    modules: dict[str, ModuleLora] = {}
    on_parameters: list[str] = []
    for module, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CrossLoraError(f"adapter {path}: module {module} has no {missing} tensor")
    matched = module_patterns(config, sorted(found))
    for i, (module, pair) in enumerate(sorted(found.items())):
        if not matched.targeted[i]:
            if _on_parameter(module, config.get("target_parameters") or []):
                on_parameters.append(module)
                continue
            raise CrossLoraError(
                f"adapter {path}: module {module} has weights but is not in "
                f"target_modules={target_modules!r}"
            )
        a_shape, b_shape = shapes[pair["A"]], shapes[pair["B"]]
        rk, ak = matched.rank_key[i], matched.alpha_key[i]
        mr = int(rank_pattern[rk]) if rk is not None else r
        malpha = float(alpha_pattern[ak]) if ak is not None else float(lora_alpha)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CrossLoraError(
                f"adapter {path}: module {module} has lora_A {a_shape} and lora_B {b_shape}, "
                "which are not LoRA factors (A: (r, in), B: (out, r))"
            )
        if a_shape[0] != mr:
            raise CrossLoraError(
                f"adapter {path}: module {module} has rank {a_shape[0]} but the config says r={mr}"
            )
        modules[module] = ModuleLora(
            module, pair["A"], pair["B"], mr, malpha, lora_scale(malpha, mr, use_rslora),
            (b_shape[0], a_shape[1]),
        )  # fmt: skip
    # layers_to_transform is checked against the source model's layers in plan.plan_transfer
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Adapter(path, config, r, float(lora_alpha), use_rslora, modules, dtype, tensors,
                   tuple(on_parameters))  # fmt: skip


def _on_parameter(module: str, targets: list[str]) -> bool:
    """Whether PEFT's ``target_parameters`` put ``module``'s LoRA on one of its parameters. PEFT
    matches ``<module>.<parameter>`` against each target by suffix, so a target ``p`` may be a
    parameter of any module, ``m.p`` one of a module whose path ends in ``m``; a module with
    several targeted parameters nests its wrappers (``<module>.base_layer``)."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    for target in targets:
        owner = target.rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return True
    return False


def _refuse_unsupported(key: str) -> None:
    if "lora_magnitude_vector" in key:
        raise CrossLoraError(f"adapter weights: {key} is a DoRA magnitude; DoRA is not supported")
    if "lora_embedding_" in key:
        raise CrossLoraError(f"adapter weights: {key} is an embedding LoRA, which is not supported")
    if re.search(r"\.lora_[AB]\.bias$", key):
        raise CrossLoraError(f"adapter weights: {key} is a LoRA bias, which is not supported")


def check_adapter_weights(path: Path, allow_pickle: bool) -> None:
    """The pickle policy of ``read_adapter`` for an adapter that PEFT will load (``eval``): an
    adapter whose weights are only ``adapter_model.bin`` is refused without ``allow_pickle``, and
    with it must load with ``torch.load(weights_only=True)`` as a dict of tensors."""
    if not (path / WEIGHTS_NAME).exists() and (path / PICKLE_WEIGHTS_NAME).exists():
        _open_weights(path, allow_pickle)


def _open_weights(path: Path, allow_pickle: bool) -> TensorFile | dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if weights.exists():
        return TensorFile(weights)
    pickled = path / PICKLE_WEIGHTS_NAME
    if pickled.exists():
        if not allow_pickle:
            raise CrossLoraError(
                f"adapter {path}: weights are a pickle ({PICKLE_WEIGHTS_NAME}); pass --allow-pickle"
                " "
                "to load them (with torch.load(weights_only=True)) or convert them to safetensors"
            )
        try:
            with open_regular(pickled) as f:  # not a FIFO or a device
                state = torch.load(f, map_location="cpu", weights_only=True)
        except OSError as err:
            raise CrossLoraError(f"adapter {pickled}: cannot read: {err.strerror or err}") from err
        except Exception as err:  # the unpickler refused it, or it is not a torch file at all
            raise CrossLoraError(
                f"adapter {pickled}: cannot load with weights_only=True ({_load_reason(err)})"
            ) from err
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CrossLoraError(f"adapter {pickled}: not a dict of tensors")
        return state
    raise CrossLoraError(f"adapter {path}: no {WEIGHTS_NAME} found")


def _load_reason(err: Exception) -> str:
    """The gist of a ``torch.load`` failure, on one line (its messages run to a page of advice,
    including to retry with ``weights_only=False``, which is exactly what we must not do)."""
    text = str(err)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    if m:
        reason = m[1]
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        boilerplate = re.compile(r"Weights only load failed|Check the documentation|\(\d\)|Please")
        useful = [line for line in lines if not boilerplate.match(line)]
        reason = (useful or lines or [type(err).__name__])[0]
    return " ".join(reason.split())[:300]


def _shape(tensors: TensorFile | dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tensors.shape(key) if isinstance(tensors, TensorFile) else tuple(tensors[key].shape)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64}  # fmt: skip


def _dtype(tensors: TensorFile | dict[str, torch.Tensor], key: str) -> torch.dtype:
    if isinstance(tensors, TensorFile):
        name = tensors.tensors[key].dtype
        if name not in _SAFETENSORS_DTYPES:
            raise CrossLoraError(f"adapter weights: {key} has dtype {name}, not a float type")
        return _SAFETENSORS_DTYPES[name]
    return tensors[key].dtype


# The models ``crosslora models pull`` installs (``crosslora.zoo.registry``, by name) -> the model
# each one is on the hub, and its licence. A pulled folder records its zoo name in its marker file
# (``crosslora.zoo.models.MARKER``; the zoo sits above this layer, so the name is repeated here).
PULLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma"),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0"),
}
PULLED_MARKER = "crosslora_model.json"
_HUB_CACHE_SNAPSHOT = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")


def looks_like_hub_id(name: object) -> bool:
    """``org/name``, as the hub spells repositories; not a path (absolute, ``./``, ``~``)."""
    return (
        isinstance(name, str)
        and name.count("/") == 1
        and HUB_ID.match(name) is not None
        and not name.startswith((".", "~"))
        and ".." not in name
    )


def pulled_model(folder: Path) -> tuple[str, str | None] | None:
    """``(hub id, licence or None)`` of a folder that ``crosslora models pull`` made, from its
    marker: the ``upstream`` id (and ``license``) it records, if any, else its zoo name's entry
    in ``PULLED_MODELS``; None for any other folder."""
    try:
        marker = read_json(folder / PULLED_MARKER, "pulled model marker")
    except CrossLoraError:
        return None
    known = PULLED_MODELS.get(str(marker.get("name")))
    upstream = marker.get("upstream")
    if looks_like_hub_id(upstream) and (known is None or known[0] != upstream):
        licence = marker.get("license")
        return upstream, licence if isinstance(licence, str) else None
    return known


def base_model_name(spec: str, folder: Path, config: dict) -> str:
    """The name a written adapter gives its base model (``base_model_name_or_path``, the model
    card's ``base_model``): a name that resolves wherever the adapter goes, not the folder where
    it was made. In order: ``spec`` if it was a hub id (not a local folder); the model config's
    ``_name_or_path`` if it is an ``org/name`` hub id; the upstream id of a folder pulled by
    ``crosslora models pull``; ``org/name`` of a snapshot in a hub cache
    (``models--org--name/snapshots/<revision>``); else the folder's name."""
    if not Path(spec).expanduser().exists() and HUB_ID.match(spec):
        return spec
    for key in ("_name_or_path", "_model_name_or_path"):
        if looks_like_hub_id(config.get(key)):
            return config[key]
    pulled = pulled_model(folder)
    if pulled:
        return pulled[0]
    here = Path(folder).expanduser().resolve()
    m = _HUB_CACHE_SNAPSHOT.match(here.parent.parent.name)
    if here.parent.name == "snapshots" and m:
        return f"{m[1]}/{m[2]}"
    return here.name


def target_modules_for(
    modules: list[str], layer_of: dict[str, int], name_of: dict[str, str], num_layers: int
) -> dict[str, object]:
    """``target_modules`` (and ``layers_to_transform``) selecting exactly ``modules``.

    ``name_of`` gives each module the name to list (its leaf, or a longer suffix where the leaf is
    ambiguous, e.g. GPT-2's two ``c_proj``). When the written modules are every listed name in
    every covered layer, a list is enough (plus ``layers_to_transform`` if not all layers are
    covered); otherwise an anchored regex of the exact module paths.
    """
    names = sorted({name_of[m] for m in modules})
    layers = sorted({layer_of[m] for m in modules})
    full = {(layer, n) for layer in layers for n in names}
    have = {(layer_of[m], name_of[m]) for m in modules}
    if full == have and len(have) == len(modules):
        fields: dict[str, object] = {"target_modules": names}
        if layers != list(range(num_layers)):
            fields["layers_to_transform"] = layers
        return fields
    return {"target_modules": "^(?:" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"}


def write_adapter(
    folder: Path,
    modules: Iterable[tuple[str, LoraFactors]],
    *,
    base_model: str,
    lora_alpha: float,
    use_rslora: bool,
    selection: dict[str, object],
    layers_pattern: str,
    fan_in_fan_out: bool,
    dtype: torch.dtype,
    metadata: dict[str, str],
    extra: dict[str, object] | None = None,
) -> dict:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``modules``.

    The adapter acts the same wherever it is served. vLLM, LoRAX and SGLang ignore
    ``rank_pattern`` and ``alpha_pattern`` and scale every module by the global
    ``lora_alpha / r``, so neither pattern is written: every module gets one rank, ``r`` = the
    largest module rank (a lower-rank module is zero-padded: zero rows of ``A``, zero columns of
    ``B``), and its scale is folded into ``B``: ``B · (scale / s)`` with
    ``s = lora_scale(lora_alpha, r, use_rslora)`` (``lora_alpha`` and ``use_rslora``: the source
    adapter's). ``modules``, ``(module path, factors)`` pairs, may be a generator: each module's
    factors are parked on disk in ``folder`` until ``r`` is known (``Spool``), and the weights file
    is streamed (``write_safetensors``), so one module's factors are in memory at a time. Returns
    the config as written.
    """
    from peft import LoraConfig

    with Spool(folder, str(folder)) as spool:
        parked = [(module, spool.park(f)) for module, f in modules]
        if not parked:
            raise CrossLoraError(f"{folder}: no modules to write")
        r = max(p.A.shape[0] for _, p in parked)
        scale = lora_scale(lora_alpha, r, use_rslora)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for module, p in parked:
                for which, factor in zip("AB", serving_factors(spool.load(p), r, scale)):
                    tensor = factor.to(dtype=dtype, copy=True).contiguous()
                    if not torch.isfinite(tensor).all():
                        raise CrossLoraError(
                            f"module {module}: lora_{which} does not fit in "
                            f"{str(dtype).split('.')[-1]} (NaN or Inf after conversion; try "
                            "--dtype float32)"
                        )
                    yield lora_key(module, which), tensor

        write_safetensors(folder / WEIGHTS_NAME, tensors(), {"format": "pt", **metadata})
        log.debug("rank %d, global scale %.6g: %d of %d modules padded, %d rescaled", r, scale,
                  sum(p.A.shape[0] != r for _, p in parked), len(parked),
                  sum(p.scale != scale for _, p in parked))  # fmt: skip
    layer_fields = dict(selection)
    if "layers_to_transform" in layer_fields:
        layer_fields["layers_pattern"] = layers_pattern
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model,
        bias="none",
        **layer_fields,
        **(extra or {}),
    )
    config.save_pretrained(str(folder))
    return read_json(folder / CONFIG_NAME, "written adapter config")


def serving_factors(f: LoraFactors, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` as ``A`` (r, in) and ``B`` (out, r) with ``scale · B @ A == f.scale · f.B @ f.A``:
    ``B`` times ``f.scale / scale`` (in at least float32) and both zero-padded to rank ``r``.
    Factors already at rank ``r`` and scale ``scale`` come back unchanged, bit for bit."""
    if f.r > r:
        raise ValueError(f"factors of rank {f.r} do not fit rank {r}")
    A, B = f.A, f.B
    if f.scale != scale:
        B = B.to(torch.promote_types(B.dtype, torch.float32)) * (f.scale / scale)
    if f.r < r:
        A = torch.cat([A, A.new_zeros(r - f.r, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], r - f.r)], dim=1)
    return A, B
