"""A benchmark config: the models, pairs, methods, tasks and settings of one ``crosslora bench``.

``BenchConfig.from_json`` reads and checks the whole file before anything runs, so that a typo
costs a second, not the hours of a run: every problem is one line that names the file and the
field. Paths are relative to the config's folder; ``pull:NAME`` names a model of the zoo.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from crosslora.bench.cache import ADAPTER_FILES
from crosslora.errors import CrossLoraError, shown


@dataclass
class BenchConfig:
    """One benchmark: what ``run_bench`` runs and what ``summarise`` reports."""

    models: dict[str, dict]  # name -> {"path": folder or "pull:NAME", "adapter": folder}
    pairs: list[tuple[str, str]]
    methods: list[str]
    tasks: list[str]
    split: str = "validation"
    limit: int | None = None
    batch_size: int = 16
    device: str = "auto"
    n_resamples: int = 2000
    seed: int = 0
    transfer: dict = field(default_factory=dict)  # extra TransferOptions fields

    @classmethod
    def from_json(cls, path: Path) -> BenchConfig:
        """Read and check a whole config before anything runs: every problem is one line that
        names the file and the field. Paths are relative to the config's folder (``~``
        expanded); ``pull:NAME`` must name a zoo model (pulled or not: ``run_bench`` checks that).
        """
        from crosslora.io.checkpoint import read_json

        data = read_json(path, "bench config")
        check = _Check(f"bench config {path}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise CrossLoraError(
                f"{check.where}: unknown keys {', '.join(unknown)} (known: {', '.join(known)})"
            )
        missing = [k for k in ("models", "methods", "tasks") if k not in data]
        if missing:
            raise CrossLoraError(f"{check.where}: missing keys {', '.join(missing)}")
        base = path.parent
        models = check.models(data["models"], base)
        pairs = check.pairs(data.get("pairs", "all"), models)
        limit = check.integer(data, "limit", None, minimum=1)
        split = data.get("split", "validation")
        if not isinstance(split, str) or not split:
            raise check.bad("split", "must be a split name such as validation or test", split)
        device = data.get("device", "auto")
        if not isinstance(device, str):
            raise check.bad("device", "must be auto, cpu, cuda or cuda:N", device)
        check.device(device)
        methods = check.methods(data["methods"])
        return cls(
            models=models,
            pairs=pairs,
            methods=methods,
            tasks=check.tasks(data["tasks"], split, limit, base),
            split=split,
            limit=limit,
            batch_size=check.integer(data, "batch_size", 16, minimum=1),
            device=device,
            n_resamples=check.integer(data, "n_resamples", 2000, minimum=1),
            seed=check.integer(data, "seed", 0, minimum=0),
            transfer=check.transfer(data.get("transfer", {}), methods, device, base),
        )


def _resolve(value: str, base: Path) -> str:
    """A path of the config, absolute (from the config's folder); ``pull:NAME`` as it is."""
    if value.startswith("pull:"):
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


class _Check:
    """The checks of ``BenchConfig.from_json``; each raises one line naming file and field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, field: str, why: str, value: object = ...) -> CrossLoraError:
        got = "" if value is ... else f" (got {shown(value)})"
        return CrossLoraError(f"{self.where}: {field}: {why}{got}")

    def integer(self, data: dict, key: str, default: int | None, minimum: int) -> int | None:
        value = data.get(key, default)
        if value is None and default is None:
            return None
        if type(value) is not int or value < minimum:
            null = " or null" if default is None else ""
            want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.bad(key, f"must be {want}{null}", value)
        return value

    def models(self, raw: object, base: Path) -> dict[str, dict]:
        shape = '{"name": {"path": "model folder or pull:NAME", "adapter": "folder"}}'
        if not isinstance(raw, dict) or not raw:
            raise self.bad("models", f"must be a non-empty object {shape}", raw)
        models = {}
        for name, entry in raw.items():
            field = f"models.{name}"
            if not name or "/" in name or name.startswith(".") or name == "all":
                raise self.bad(field, "a model's name must be a plain word (no '/', not 'all')")
            if not isinstance(entry, dict):
                raise self.bad(field, 'must be an object {"path": ..., "adapter": ...}', entry)
            extra = sorted(set(entry) - {"path", "adapter"})
            if extra:
                raise self.bad(field, f"unknown keys {', '.join(extra)} (known: path, adapter)")
            if "path" not in entry:
                raise self.bad(field, "has no path (a model folder or pull:NAME)")
            spec = entry["path"]
            if not isinstance(spec, str) or not spec:
                raise self.bad(f"{field}.path", "must be a folder or pull:NAME", spec)
            adapter = entry.get("adapter")
            if adapter is not None and (not isinstance(adapter, str) or not adapter):
                raise self.bad(f"{field}.adapter", "must be an adapter folder or null", adapter)
            models[name] = {
                "path": self.model_path(f"{field}.path", _resolve(spec, base)),
                "adapter": self.adapter(f"{field}.adapter", _resolve(adapter, base))
                if adapter
                else None,
            }
        return models

    def model_path(self, field: str, spec: str) -> str:
        if spec.startswith("pull:"):
            from crosslora.zoo.registry import get_spec

            try:
                get_spec(spec.removeprefix("pull:"))  # known, not pulled here
            except CrossLoraError as err:
                raise self.bad(field, str(err)) from err
            return spec
        folder = Path(spec)
        if not folder.exists():
            raise self.bad(field, f"{folder}: no such folder")
        if not (folder / "config.json").is_file():
            raise self.bad(field, f"{folder} is not a model folder (no config.json)")
        return spec

    def adapter(self, field: str, spec: str) -> str:
        folder = Path(spec)
        if not folder.is_dir():
            raise self.bad(field, f"{folder}: no such folder")
        if not (folder / "adapter_config.json").is_file():
            raise self.bad(field, f"{folder}: no adapter_config.json there")
        if not (folder / ADAPTER_FILES[1]).is_file():
            pickle = (
                " (it has adapter_model.bin: convert it)" * (folder / "adapter_model.bin").exists()
            )
            raise self.bad(field, f"{folder}: no adapter_model.safetensors{pickle}")
        return spec

    def pairs(self, raw: object, models: dict[str, dict]) -> list[tuple[str, str]]:
        if raw == "all":
            pairs = list(itertools.permutations(models, 2))
        elif isinstance(raw, list):
            pairs = []
            for k, pair in enumerate(raw):
                if not (
                    isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(n, str) for n in pair)
                ):  # fmt: skip
                    raise self.bad(f"pairs[{k}]", 'must be ["source", "target"]', pair)
                for n in pair:
                    if n not in models:
                        raise self.bad(
                            f"pairs[{k}]", f"names an unknown model {n!r} (models: "
                            f"{', '.join(models)})",
                        )  # fmt: skip
                if tuple(pair) in pairs:
                    raise self.bad(f"pairs[{k}]", "is given twice", pair)
                pairs.append((pair[0], pair[1]))
        else:
            raise self.bad("pairs", '"all" or a list of ["source", "target"]', raw)
        if not pairs:
            raise self.bad("pairs", "no pair to run (name two models or more)", raw)
        for name in sorted({n for p in pairs for n in p}):
            if not models[name]["adapter"]:
                raise self.bad(
                    f"models.{name}", "needs an adapter: it is in a pair (source and oracle)"
                )
        return pairs

    def methods(self, raw: object) -> list[str]:
        from crosslora.methods import DEFAULT_METHOD, METHODS

        if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
            raise self.bad("methods", "must be a non-empty list of method names", raw)
        # "default": whatever `crosslora transfer` uses by default
        methods = [DEFAULT_METHOD if m == "default" else m for m in raw]
        for m in methods:
            if m not in METHODS:
                raise self.bad(
                    "methods", f"unknown method {m!r}; choose from {', '.join(sorted(METHODS))}"
                )
        if len(set(methods)) != len(methods):
            raise self.bad("methods", "a method is given twice", raw)
        return methods

    def tasks(self, raw: object, split: str, limit: int | None, base: Path) -> list[str]:
        from crosslora.eval.tasks import check_split, load_items, resolve_task

        if not isinstance(raw, list) or not raw or not all(isinstance(t, str) and t for t in raw):
            raise self.bad("tasks", "must be a non-empty list of task names or .json files", raw)
        tasks = [_resolve(t, base) if t.endswith(".json") else t for t in raw]
        specs = []
        for t in tasks:
            try:
                specs.append(resolve_task(t))
            except CrossLoraError as err:
                raise self.bad("tasks", str(err)) from err
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise self.bad("tasks", "a task is given twice", names)
        try:
            check_split(specs, split)
        except CrossLoraError as err:
            raise self.bad("split", str(err)) from err
        for spec in specs:  # a task file's own data is local: its rows are checked now
            if split in spec.files:
                try:
                    items, source = load_items(spec, split, limit)
                except CrossLoraError as err:
                    raise self.bad("tasks", str(err)) from err
                if not items:
                    raise self.bad("tasks", f"task {spec.name} ({split}, {source}) has no items")
        return tasks

    def device(self, device: str) -> None:
        from crosslora.device import resolve_device

        try:
            resolve_device(device)
        except CrossLoraError as err:
            raise self.bad("device", str(err).removeprefix("--device ")) from err

    def transfer(self, raw: object, methods: list[str], device: str, base: Path) -> dict:
        import typing

        from crosslora.layer_map import LAYER_MAPS
        from crosslora.pipeline import TransferOptions, check_options

        if not isinstance(raw, dict):
            raise self.bad("transfer", "must be an object of transfer options", raw)
        hints = typing.get_type_hints(TransferOptions)
        allowed = [k for k in hints if k not in ("method", "device")]
        for key, value in raw.items():
            field = f"transfer.{key}"
            if key in ("method", "device"):
                raise self.bad(field, f"set by the config's {key}{'s' * (key == 'method')}")
            if key not in hints:
                raise self.bad("transfer", f"unknown option {key!r} (known: {', '.join(allowed)})")
            hint = hints[key]
            types = typing.get_args(hint) or (hint,)
            if not isinstance(value, hint) or isinstance(value, bool) and bool not in types:
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise self.bad(field, f"must be {want}", value)
        options = dict(raw)
        if options.get("layer_map") is not None and options["layer_map"] not in LAYER_MAPS:
            raise self.bad("transfer.layer_map", f"choose from {', '.join(LAYER_MAPS)}",
                           options["layer_map"])  # fmt: skip
        for key in ("truncation_rank", "cache_min_elements"):
            low = 1 if key == "truncation_rank" else 0
            if options.get(key) is not None and options[key] < low:
                raise self.bad(f"transfer.{key}", f"must be at least {low}", options[key])
        if options.get("cache_dir"):
            options["cache_dir"] = _resolve(options["cache_dir"], base)
        for method in methods:
            try:
                check_options(TransferOptions(method=method, device=device, **options))
            except CrossLoraError as err:
                raise self.bad("transfer", str(err).removeprefix("--")) from err
        return options
