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
        from crosslora.io.checkpoint import read_json

        data = read_json(path, "bench config")
        base = path.parent
        models = {}
        for name, entry in data.get("models", {}).items():
            models[name] = {
                "path": _resolve(entry["path"], base),
                "adapter": _resolve(entry["adapter"], base) if entry.get("adapter") else None,
            }
        pairs = data.get("pairs", "all")
        if pairs == "all":
            pairs = [p for p in itertools.permutations(models, 2)]
        for s, t in pairs:
            if s not in models or t not in models:
                raise CrossLoraError(f"bench config: pair {s} -> {t} names an unknown model")
        known = {f.name for f in cls.__dataclass_fields__.values()} - {"models", "pairs"}
        extra = {k: v for k, v in data.items() if k in known}
        if "methods" in extra:  # "default": whatever `crosslora transfer` uses by default
            from crosslora.methods import DEFAULT_METHOD

            extra["methods"] = [DEFAULT_METHOD if m == "default" else m for m in extra["methods"]]
        return cls(models=models, pairs=[tuple(p) for p in pairs], **extra)


def _resolve(value: str, base: Path) -> str:
    if value.startswith("pull:"):
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


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
        from peft import PeftModel

        from crosslora.eval import evaluate

        log.info("evaluating %s%s", model, f" + {adapter}" if adapter else "")
        base, tokenizer = self._load(model)
        net = PeftModel.from_pretrained(base, str(adapter)) if adapter else base
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
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from crosslora.eval import resolve_device

            self._loaded = None
            folder = self.folders[model]
            net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            net.to(resolve_device(self.config.device)).eval()
            self._loaded = (model, net, AutoTokenizer.from_pretrained(folder))
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
    """Run (or resume) the benchmark; writes ``results.json``, ``results.md``, ``results.png``."""
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(config, out, progress)
    for name in {n for pair in config.pairs for n in pair}:
        if not config.models[name].get("adapter"):
            raise CrossLoraError(f"bench config: model {name} needs an adapter (source and oracle)")
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
