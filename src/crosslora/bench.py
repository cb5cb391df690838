"""The transfer benchmark: for each (source, target) pair, how much of the target's own adapter
effect (the oracle's gap over the base) each method's transferred adapter recovers.

A config names the models (folder and own adapter), the pairs, the methods and the tasks. For
every pair it evaluates the target's base, the source adapter on its own model, the oracle (the
target's own adapter) and each method's transfer, then reports accuracy and NLL with
**gap recovered** = (transferred − base) / (oracle − base), with bootstrap 95 % intervals over
items ("undefined" when the oracle's gap is inside the noise).

Resumable: every transfer and every evaluation is cached under ``<out>/cache`` by a hash of its
inputs (adapter contents, model file identities, settings, crosslora version and source code; a
transfer is kept as its adapter folder), so a second run with the same inputs evaluates nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crosslora import __version__
from crosslora.errors import CrossLoraError

log = logging.getLogger("crosslora")
GAP_METRICS = ("acc", "acc_norm", "nll")


@dataclass
class BenchConfig:
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
        expanded); ``pull:NAME`` must name a zoo model (it is pulled only when the bench runs).
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
    if value.startswith("pull:"):
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def _shown(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Check:
    """The checks of ``BenchConfig.from_json``; each raises one line naming file and field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, field: str, why: str, value: object = ...) -> CrossLoraError:
        got = "" if value is ... else f" (got {_shown(value)})"
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
            from crosslora.zoo.models import get_spec

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
        from crosslora.transfer import TransferOptions, check_options

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


def model_folder(spec: str) -> Path:
    """A model folder; ``pull:NAME`` pulls a zoo model first (idempotent)."""
    if spec.startswith("pull:"):
        from crosslora.zoo.models import pull

        return pull([spec.removeprefix("pull:")])[0]
    return Path(spec)


# --- cache keys -----------------------------------------------------------------------------


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def code_digest() -> str:
    """A hash of crosslora's own source files: a transfer made by other code is not reused."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")) + sorted(root.rglob("*.json")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:20]


def folder_identity(folder: Path, content: bool, names: tuple[str, ...] | None = None) -> dict:
    """Files of a folder (all, or ``names``) with their content hash (``content``) or size and
    mtime. Adapters are identified by their two PEFT files only, so notes beside them (README,
    evaluation logs) do not invalidate cached results."""
    out = {}
    files = [folder / n for n in names] if names else folder.iterdir()
    for f in sorted(p for p in files if p.is_file() and not p.name.startswith(".")):
        if content:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
    return out


class Cache:
    """JSON results by key, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())
        self.misses += 1
        return None

    def put(self, key: str, value: dict) -> None:
        tmp = self.root / f".{key}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.root / f"{key}.json")


# --- running --------------------------------------------------------------------------------


class Runner:
    def __init__(self, config: BenchConfig, out: Path, progress: bool) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.cache = Cache(out / "cache")
        self.folders = {name: model_folder(m["path"]) for name, m in config.models.items()}
        self.model_ids = {n: folder_identity(f, content=False) for n, f in self.folders.items()}
        self._loaded: tuple[str, object, object] | None = None
        self.code = code_digest()

    def settings(self) -> dict:
        c = self.config
        return {"tasks": c.tasks, "split": c.split, "limit": c.limit, "batch_size": c.batch_size}

    def evaluate(self, model: str, adapter: Path | None) -> dict:
        key = _digest({
            "what": "eval", "model": self.model_ids[model], "settings": self.settings(),
            "adapter": folder_identity(adapter, True, ADAPTER_FILES) if adapter else None,
        })  # fmt: skip
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        from crosslora.eval import evaluate
        from crosslora.io.pretrained import load_peft_adapter

        log.info("evaluating %s%s", model, f" + {adapter}" if adapter else "")
        if adapter:
            refuse_pickle_adapter(adapter, model)
        base, tokenizer = self._load(model)
        net = load_peft_adapter(base, adapter) if adapter else base
        try:
            result = evaluate(
                net, tokenizer, self.config.tasks, self.config.split, self.config.limit,
                self.config.batch_size, progress=self.progress, install_data=True,
            )  # fmt: skip
        finally:
            if adapter:
                net.unload()  # restores the base modules, so the loaded base is reused
        self.cache.put(key, result)
        return result

    def _load(self, model: str):
        if self._loaded is None or self._loaded[0] != model:
            from crosslora.device import resolve_device
            from crosslora.io.pretrained import load_causal_lm, load_tokenizer

            self._loaded = None
            folder = self.folders[model]
            what = f"bench model {model}"
            try:  # never code from the model's folder: trust_remote_code=False
                net = load_causal_lm(folder, what, dtype=torch.float32)
                tokenizer = load_tokenizer(folder, what)
            except (OSError, ValueError) as err:
                line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise CrossLoraError(f"{what}: cannot load {folder}: {line}") from err
            net.to(resolve_device(self.config.device)).eval()
            self._loaded = (model, net, tokenizer)
        return self._loaded[1], self._loaded[2]

    def transfer(self, source: str, target: str, method: str) -> Path:
        from crosslora.transfer import TransferOptions, transfer

        adapter = Path(self.config.models[source]["adapter"])
        key = _digest({
            "what": "transfer", "method": method, "version": __version__, "code": self.code,
            "source": self.model_ids[source], "target": self.model_ids[target],
            "adapter": folder_identity(adapter, True, ADAPTER_FILES),
            "options": self.config.transfer,
        })  # fmt: skip
        out = self.out / "adapters" / f"{source}--{target}--{method}-{key[:8]}"
        if (out / "adapter_model.safetensors").exists():
            return out
        log.info("transferring %s -> %s with %s", source, target, method)
        options = TransferOptions(method=method, device=self.config.device, **self.config.transfer)
        transfer(str(adapter), str(self.folders[source]), str(self.folders[target]), out,
                 options, overwrite=True, progress=self.progress)  # fmt: skip
        return out


def run_bench(config: BenchConfig, out: Path, progress: bool = True) -> dict:
    """Run (or resume) the benchmark; writes ``results.json``, ``results.md``, ``results.png``.

    ``out`` must be new, empty, or a bench folder (resumed); it may not overlap any model or
    adapter of the config, and one run at a time holds it."""
    from crosslora.io.output import claim_bench_folder

    inputs = [
        (f"{what} of {name}", path)
        for name, m in config.models.items()
        for what, path in (("model", m["path"]), ("adapter", m.get("adapter")))
        if path and not str(path).startswith("pull:")
    ]
    with claim_bench_folder(out, inputs) as folder:
        return _run_bench(config, folder, progress)


def refuse_pickle_adapter(adapter: Path, model: str) -> None:
    """bench takes safetensors adapters only (its config's are checked when it is read): it has
    no ``--allow-pickle``, and its cache keys identify an adapter by its safetensors file."""
    if not (adapter / ADAPTER_FILES[1]).exists() and (adapter / "adapter_model.bin").exists():
        raise CrossLoraError(
            f"bench config: the adapter of model {model} ({adapter}) is a pickle "
            "(adapter_model.bin); bench takes adapter_model.safetensors only: convert it first"
        )


def _run_bench(config: BenchConfig, out: Path, progress: bool) -> dict:
    from crosslora.io.pretrained import refuse_remote_code

    runner = Runner(config, out, progress)
    for name in {n for pair in config.pairs for n in pair}:
        if not config.models[name].get("adapter"):
            raise CrossLoraError(f"bench config: model {name} needs an adapter (source and oracle)")
        refuse_remote_code(runner.folders[name], f"bench model {name}")
    transfers = {
        (s, t, m): runner.transfer(s, t, m) for s, t in config.pairs for m in config.methods
    }
    evals: dict[tuple, dict] = {}
    by_target = sorted({t for _, t in config.pairs} | {s for s, _ in config.pairs})
    for model in by_target:  # one model load per model, its adapters evaluated on it
        evals[(model, "base")] = runner.evaluate(model, None)
        evals[(model, "own")] = runner.evaluate(model, Path(config.models[model]["adapter"]))
        for (s, t, m), path in transfers.items():
            if t == model:
                evals[(s, t, m)] = runner.evaluate(model, path)
    results = summarise(config, evals)
    results["cache"] = {"hits": runner.cache.hits, "misses": runner.cache.misses}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(format_markdown(results))
    plot(results, out / "results.png")
    return results


# --- summarising ----------------------------------------------------------------------------


def _values(result: dict, task: str, metric: str) -> dict[str, float]:
    return {rec["id"]: rec[metric] for rec in result["tasks"][task]["items"]}


def _gap(base: dict, transferred: dict, oracle: dict, tasks: list[str], metric: str,
         n_resamples: int, seed: int) -> dict:  # fmt: skip
    from crosslora.eval.metrics import gap_recovered

    cols: list[list[float]] = [[], [], []]
    for task in tasks:
        maps = [_values(r, task, metric) for r in (base, transferred, oracle)]
        ids = [k for k in maps[0] if k in maps[1] and k in maps[2]]
        for col, m in zip(cols, maps):
            col.extend(m[k] for k in ids)
    g = gap_recovered(*cols, n_resamples=n_resamples, seed=seed)
    return {**g.as_dict(), "text": str(g), "n": len(cols[0])}


def verdict(gap: dict, metric: str) -> str:
    """helped / hurt / inconclusive, from the transferred − base interval alone."""
    d = gap["transferred_minus_base"]
    sign = -1.0 if metric == "nll" else 1.0  # lower NLL is better
    low, high = sorted((sign * d["low"], sign * d["high"]))
    return "helped" if low > 0 else "hurt" if high < 0 else "inconclusive"


def summarise(config: BenchConfig, evals: dict[tuple, dict]) -> dict:
    tasks = list(next(iter(evals.values()))["tasks"])  # names (config entries may be files)
    rows = []
    for s, t in config.pairs:
        base, oracle, source = evals[(t, "base")], evals[(t, "own")], evals[(s, "own")]
        entry = {"source": s, "target": t, "configs": {}, "methods": {}}
        for label, res in (
            ("base", base),
            ("oracle", oracle),
            ("source adapter on source", source),
        ):
            entry["configs"][label] = {task: res["tasks"][task]["metrics"] for task in tasks}
        for m in config.methods:
            res = evals[(s, t, m)]
            entry["configs"][m] = {task: res["tasks"][task]["metrics"] for task in tasks}
            gaps = {}
            for metric in GAP_METRICS:
                per_task = {task: _gap(base, res, oracle, [task], metric, config.n_resamples,
                                       config.seed) for task in tasks}  # fmt: skip
                pooled = _gap(base, res, oracle, tasks, metric, config.n_resamples,
                              config.seed)  # fmt: skip
                pooled["verdict"] = verdict(pooled, metric)
                gaps[metric] = {"all": pooled, **per_task}
            entry["methods"][m] = gaps
        rows.append(entry)
    return {
        "crosslora_version": __version__,
        "settings": {
            "tasks": tasks,
            "split": config.split,
            "limit": config.limit,
            "methods": config.methods,
            "n_resamples": config.n_resamples,
            "transfer": config.transfer,
        },  # fmt: skip
        "pairs": rows,
    }


def _pm(metric: dict, digits: int = 3) -> str:
    return f"{metric['value']:.{digits}f} ± {metric['stderr']:.{digits}f}"


def format_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Transfer benchmark",
        "",
        f"Tasks {', '.join(s['tasks'])} ({s['split']}, first {s['limit'] or 'all'} items each); "
        "gap recovered = (transferred − base) / (oracle − base) with a "
        f"{s['n_resamples']}-resample bootstrap 95 % interval over items, pooled over tasks. "
        "*undefined*: the oracle does not beat the base beyond the noise. Verdict: whether "
        "transferred − base is outside the noise.",
        "",
        "## Gap recovered, all tasks pooled",
        "",
        "| source → target | method | NLL gap recovered | NLL verdict | acc_norm gap recovered "
        "| acc_norm verdict |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        for m, gaps in p["methods"].items():
            lines.append(
                f"| {p['source']} → {p['target']} | {m} | {gaps['nll']['all']['text']} | "
                f"{gaps['nll']['all']['verdict']} | {gaps['acc_norm']['all']['text']} | "
                f"{gaps['acc_norm']['all']['verdict']} |"
            )
    lines += ["", "## Per task", ""]
    for p in results["pairs"]:
        lines += [f"### {p['source']} → {p['target']}", "",
                  "| config | task | acc | acc_norm | NLL | NLL gap recovered |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for label, per_task in p["configs"].items():
            for task, mt in per_task.items():
                gap = p["methods"].get(label, {}).get("nll", {}).get(task, {}).get("text", "")
                lines.append(f"| {label} | {task} | {_pm(mt['acc'])} | {_pm(mt['acc_norm'])} | "
                             f"{_pm(mt['nll'])} | {gap} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log.warning("warning: matplotlib is missing; no plot (pip install 'crosslora[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["pairs"]
    methods = results["settings"]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(pairs) + 3), 4), sharey=False)
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, ("nll", "acc_norm")):
        for k, m in enumerate(methods):
            xs, ys, lo, hi, undefined = [], [], [], [], []
            for i, p in enumerate(pairs):
                g = p["methods"][m][metric]["all"]
                x = i + (k - (len(methods) - 1) / 2) * width
                if g["interval"] is None:
                    undefined.append(x)
                    continue
                iv = g["interval"]
                xs.append(x)
                ys.append(iv["point"])
                lo.append(iv["point"] - iv["low"])
                hi.append(iv["high"] - iv["point"])
            ax.bar(xs, ys, width, yerr=np.array([lo, hi]) if xs else None, label=m, capsize=2)
            if undefined:
                ax.plot(undefined, [0] * len(undefined), "x", color="gray")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(pairs)), [f"{p['source']}\n→ {p['target']}" for p in pairs],
                      fontsize=7)  # fmt: skip
        ax.set_title(f"gap recovered ({metric}); x: undefined", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
