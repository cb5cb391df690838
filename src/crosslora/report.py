"""What a transfer did, for people and for tools: ``transfer_report.json`` and a model card."""

from __future__ import annotations

import shlex
from pathlib import Path

from crosslora.core import Inputs, ModuleResult
from crosslora.io.files import open_regular
from crosslora.io.peft_adapter import base_model_name, pulled_model
from crosslora.linalg import DEFAULT_SVD, DEFAULT_TRUNCATION_RANK
from crosslora.methods import expectation
from crosslora.plan import TransferPlan
from crosslora.version import __version__

CARD_TAGS = ["crosslora", "lora", "peft"]
_CARD_BYTES = 1 << 20  # a README's front matter is read from its first MiB


def build_report(
    inputs: Inputs,
    plan: TransferPlan,
    results: list[ModuleResult],
    settings: dict,
    seconds: float,
    out: str | Path | None = None,
) -> dict:
    """The report of one transfer. ``settings`` are the ``TransferOptions`` as a dict (with the
    device that ran); ``out`` the output folder as given, for the ``command`` that made it."""
    lm = plan.layer_map
    modules = []
    for res in results:
        t = res.task
        modules.append({
            "layer": [t.src.layer, t.tgt.layer],
            "role": t.src.role,
            "source_key": t.adapter_module,
            "target_key": t.tgt.slot.module,
            "source_shape": list(t.src.shape),
            "target_shape": list(t.tgt.shape),
            "method": plan.method,
            "seconds": round(res.seconds, 4),
            "status": "skipped" if res.skipped else "transferred",
            **({"reason": res.skipped} if res.skipped else {}),
            "diagnostics": res.diagnostics,
        })  # fmt: skip
    transferred = sum(1 for r in results if r.skipped is None)
    tgt = inputs.tgt.checkpoint
    report = {
        "crosslora_version": __version__,
        "method": plan.method,
        "source_model": inputs.src_name,
        "target_model": inputs.tgt_name,
        "base_model": settings.get("base_model_name_or_path")
        or base_model_name(inputs.tgt_name, tgt.path, tgt.config),
        "source_adapter": str(inputs.adapter.path),
        "source_family": inputs.src.checkpoint.model_type,
        "target_family": inputs.tgt.checkpoint.model_type,
        "licenses": {
            "source_adapter": card_license(inputs.adapter.path),
            "source_model": model_license(inputs.src.checkpoint.path),
            "target_model": model_license(tgt.path),
        },
        "settings": settings,
        "method_diagnostics": plan.diagnostics,
        "layer_map": {
            "kind": lm.kind,
            "source_layers": lm.src_layers,
            "target_layers": lm.tgt_layers,
            "pairs": {str(i): j for i, j in sorted(lm.pairs.items())},
            "unmatched_source_layers": lm.unmatched_src,
            "unmatched_target_layers": lm.unmatched_tgt,
        },
        "summary": {
            "planned": len(plan.tasks),
            "transferred": transferred,
            "skipped_when_run": len(results) - transferred,
            "skipped_when_planned": len(plan.skipped),
            "seconds": round(seconds, 3),
        },
        "modules": modules,
        "skipped": [{"module": s.what, "reason": s.reason} for s in plan.skipped],
    }
    report["command"] = transfer_command(report, "OUT" if out is None else str(out))
    return report


def front_matter(readme: Path) -> dict:
    """The YAML front matter (``---`` ... ``---`` at the top) of a model card, or ``{}`` if it has
    none, it does not parse, or the file cannot be read."""
    import yaml

    try:
        with open_regular(readme) as f:
            text = f.read(_CARD_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def card_license(folder: Path) -> str | None:
    """The ``license`` of the model card (``README.md``) in ``folder``, if it states one."""
    licence = front_matter(Path(folder) / "README.md").get("license")
    return licence if isinstance(licence, str) and licence.strip() else None


def model_license(folder: Path) -> str | None:
    """A base model's licence where known: its card's, else that of the model it was pulled as."""
    pulled = pulled_model(Path(folder))
    return card_license(folder) or (pulled[1] if pulled else None)


def transfer_command(report: dict, out: str) -> str:
    """The ``crosslora transfer`` line that makes this transfer again (to ``out``), from the
    report's inputs and settings: the method and layer map as they ran, other options where they
    are not the defaults. Settings that only the Python API sets are left to the report."""
    s = report["settings"]
    argv = ["crosslora", "transfer", "--adapter", report["source_adapter"],
            "--source-model", report["source_model"], "--target-model", report["target_model"],
            "--out-path", out, "--method", report["method"],
            "--layer-map", report["layer_map"]["kind"]]  # fmt: skip
    rank = s.get("truncation_rank", DEFAULT_TRUNCATION_RANK)
    if rank != DEFAULT_TRUNCATION_RANK:
        argv += ["--truncation-rank", "full" if rank is None else str(rank)]
    if s.get("svd", DEFAULT_SVD) != DEFAULT_SVD:
        argv += ["--svd", s["svd"]]
    if not s.get("cache", True):
        argv.append("--no-cache")
    elif s.get("cache_dir"):
        argv += ["--cache-dir", s["cache_dir"]]
    if s.get("device"):
        argv += ["--device", s["device"]]
    if s.get("dtype"):
        argv += ["--dtype", s["dtype"]]
    if s.get("draws", 1) != 1:
        argv += ["--draws", str(s["draws"])]
    if s.get("allow_pickle"):
        argv.append("--allow-pickle")
    if s.get("base_model_name_or_path"):
        argv += ["--base-model-name-or-path", s["base_model_name_or_path"]]
    return shlex.join(argv)


def _fidelity_line(report: dict) -> str:
    """The measured agreement on the probe text, where the method measured it (``matched``)."""
    diag = report.get("method_diagnostics", {})
    if "draws" in diag:
        corr = [d["probe_effect"]["corr"] for d in diag["draws"] if "probe_effect" in d]
        if not corr:
            return ""
        return (
            f"- The mean of {len(diag['draws'])} transfers, each with its own text that the two "
            f"base models\n  generated themselves (no data). Each draw's adapter, on its own "
            f"text, correlates\n  {min(corr):.2f} to {max(corr):.2f} with the source adapter's "
            f"effect on the target's log-likelihoods;\n  the mean's agreement was not measured.\n"
        )
    eff = diag.get("probe_effect")
    if not eff:
        return ""
    line = (
        f"- Measured on text the two base models generated themselves (no data): this adapter's\n"
        f"  effect on the target's log-likelihoods explains {eff['explained']:.0%} of the source\n"
        f"  adapter's effect on the source's (correlation {eff['corr']:.2f})"
    )
    size = diag.get("disattenuation", 1.0)
    if size == 1.0:
        return line + ".\n"
    ls = diag["probe_effect_least_squares"]["explained"]
    return line + (
        f". It is sized {size:.2f}× the\n  least-squares fit to that effect (which explains "
        f"{ls:.0%}): at a correlation below 1, least\n  squares sizes a transfer too small "
        f"(docs/methods.md, the least squares' attenuation).\n"
    )


def card_metadata(report: dict) -> dict:
    """The card's front matter: what the Hub reads (``base_model``, ``library_name``, ``tags``,
    and ``license``: the source adapter's, else the target model's, where known)."""
    licences = report.get("licenses", {})
    licence = licences.get("source_adapter") or licences.get("target_model")
    meta: dict[str, object] = {"base_model": report.get("base_model") or report["target_model"]}
    meta["library_name"] = "peft"
    if licence:
        meta["license"] = licence
    meta["tags"] = list(CARD_TAGS)
    return meta


def _licence_lines(report: dict) -> str:
    licences = report.get("licenses", {})
    named = [("source adapter", "source_adapter", report["source_adapter"]),
             ("source model", "source_model", report["source_model"]),
             ("target model", "target_model", report["target_model"])]  # fmt: skip
    lines = [f"- {what} (`{name}`): {licences.get(key) or 'not stated'}"
             for what, key, name in named]  # fmt: skip
    return "\n".join(lines)


def _origin(report: dict, base: str, given: str) -> str:
    made = (f"from an adapter for `{report['source_model']}` (`{report['source_adapter']}`) by "
            f"crosslora {report['crosslora_version']}, method `{report['method']}`")  # fmt: skip
    if report.get("refine"):
        return (f"This adapter for `{base}`{given} was transferred {made}, then **trained** on "
                "text the source model wrote with its adapter (see Refine).")  # fmt: skip
    return (f"This adapter was **not trained** on `{base}`{given}. It was transferred without "
            f"data or training {made}.")  # fmt: skip


def _refine_lines(report: dict) -> str:
    """The card's account of ``--refine``: what it read, how long it ran, its loss curve."""
    r = report.get("refine")
    if not r:
        return ""
    curve = r["loss_curve"]
    marks = curve[:: max(1, len(curve) // 8)]
    marks += [curve[-1]] if marks[-1] != curve[-1] else []
    losses = ", ".join(f"{step}: {loss:.4f}" for step, loss in marks)
    seeded = f"{r['prompts']} prompts" if r["prompts"] else "no prompts (data-free)"
    read = r.get("prompt_nll_per_char")
    chosen = (f", chosen by `auto`: the source base reads the prompts at {read['source']:.3f} "
              f"nats per character, the target base at {read['target']:.3f}") if read else ""
    start = "the transfer" if r["start"] == "transfer" else "an untrained LoRA"
    return f"""
## Refine

After the transfer the adapter was **trained** for {r["steps"]} steps of {r["batch"]} texts
(objective `{r["objective"]}`{chosen}, starting from {start}), on text the source model wrote
with its adapter from {seeded}:
{r["texts_written"]} texts written, {r["texts_kept"]} kept, {r["source_tokens_kept"]} source and
{r["target_tokens_kept"]} target tokens selected where the adapter acts most. It took
{r["seconds_teacher"]} s for the teacher and {r["seconds_training"]} s of training.
Training loss by step: {losses}.
"""


def model_card(report: dict) -> str:
    """``README.md`` of a written adapter: Hub front matter, then what was done, how to do it
    again, what to expect of the method, the inputs' licences and how to load it."""
    import yaml

    s, lm = report["summary"], report["layer_map"]
    skipped = s["skipped_when_run"] + s["skipped_when_planned"]
    meta = yaml.safe_dump(card_metadata(report), sort_keys=False, allow_unicode=True)
    said, warn = expectation(report["method"])
    said = said[0].upper() + said[1:]
    command = report.get("command") or transfer_command(report, "OUT")
    base = report.get("base_model") or report["target_model"]
    given = f" (given as `{report['target_model']}`)" if base != report["target_model"] else ""
    return f"""---
{meta}---

# LoRA adapter transferred with crosslora

{_origin(report, base, given)}

- Layer map: `{lm["kind"]}`, {lm["source_layers"]} source -> {lm["target_layers"]} target layers,
  {len(lm["pairs"])} matched.
- Modules: {s["transferred"]} transferred, {skipped} skipped (reasons in `transfer_report.json`).
{_fidelity_line(report)}{_refine_lines(report)}
Made with:

```bash
{command}
```

## What to expect

{"**Warning:** " if warn else ""}{said}.

How much of the source adapter's effect survives a transfer varies by pair and method; measure
it on your task before relying on it (for example with `crosslora eval`).

## Licences

This adapter is derived from the source adapter and made for the target model; their terms
apply to it. Licences as their model cards (or `crosslora models pull`) state them:

{_licence_lines(report)}

## Use

A standard PEFT LoRA adapter for `{base}`, with one rank and no rank or alpha patterns, so that
PEFT, vLLM, LoRAX and SGLang apply it alike:

```python
from peft import AutoPeftModelForCausalLM, PeftModel
model = AutoPeftModelForCausalLM.from_pretrained("<this folder>")  # loads {base}
model = PeftModel.from_pretrained(base_model, "<this folder>")  # or onto a model you loaded
```
"""
