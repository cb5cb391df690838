"""Running a benchmark: every transfer and evaluation of a config, each cached, then the report.

``run_bench`` checks first that everything the run needs is here (the benchmark data, every
``pull:NAME`` model pulled), before it claims the output folder or loads a model, so that a
missing piece costs a line, not a half-done run. Then ``Runner`` makes each transfer (kept as
its adapter folder) and each evaluation (kept as JSON), unless the cache already holds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from crosslora.bench.cache import ADAPTER_FILES, Cache, behaviour_digest, digest, folder_identity
from crosslora.bench.config import BenchConfig
from crosslora.bench.plot import plot
from crosslora.bench.summary import format_markdown, summarise
from crosslora.errors import CrossLoraError, one_line
from crosslora.version import __version__

log = logging.getLogger("crosslora")


def model_folder(spec: str) -> Path:
    """A model folder; ``pull:NAME`` is a zoo model's folder, which must be pulled already
    (else one line: ``crosslora models pull NAME``; bench itself installs nothing)."""
    if spec.startswith("pull:"):
        from crosslora.zoo.models import model_path

        return model_path(spec.removeprefix("pull:"), must_exist=True)
    return Path(spec)


def check_ready(config: BenchConfig) -> None:
    """What the run needs and a user installs, checked before any work: the benchmark data of
    its tasks (``crosslora models pull-data``) and its zoo models (``crosslora models pull``)."""
    from crosslora.eval.data import require_data
    from crosslora.eval.tasks import resolve_tasks

    require_data(resolve_tasks(config.tasks, config.split), config.split)
    for m in config.models.values():
        model_folder(m["path"])


class Runner:
    """The transfers and evaluations of one config, each cached under ``<out>/cache`` (results)
    or ``<out>/adapters`` (transferred adapters); one model is kept loaded at a time."""

    def __init__(self, config: BenchConfig, out: Path, progress: bool) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.cache = Cache(out / "cache")
        self.folders = {name: model_folder(m["path"]) for name, m in config.models.items()}
        self.model_ids = {n: folder_identity(f, content=False) for n, f in self.folders.items()}
        self._loaded: tuple[str, object, object] | None = None
        self.code = behaviour_digest()

    def settings(self) -> dict:
        c = self.config
        return {"tasks": c.tasks, "split": c.split, "limit": c.limit, "batch_size": c.batch_size}

    def evaluate(self, model: str, adapter: Path | None) -> dict:
        key = digest({
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
                self.config.batch_size, progress=self.progress,
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
                raise CrossLoraError(
                    f"{what}: cannot load {folder}: {one_line(err, 'head')}"
                ) from err
            net.to(resolve_device(self.config.device)).eval()
            self._loaded = (model, net, tokenizer)
        return self._loaded[1], self._loaded[2]

    def transfer(self, source: str, target: str, method: str) -> Path:
        from crosslora.pipeline import TransferOptions, transfer

        adapter = Path(self.config.models[source]["adapter"])
        key = digest({
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

    check_ready(config)
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
