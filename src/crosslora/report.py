"""What a transfer did, for people and for tools: ``transfer_report.json`` and a model card."""

from __future__ import annotations

from crosslora.core import Inputs, ModuleResult
from crosslora.plan import TransferPlan
from crosslora.version import __version__


def build_report(
    inputs: Inputs, plan: TransferPlan, results: list[ModuleResult], settings: dict, seconds: float
) -> dict:
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
    return {
        "crosslora_version": __version__,
        "method": plan.method,
        "source_model": inputs.src_name,
        "target_model": inputs.tgt_name,
        "source_adapter": str(inputs.adapter.path),
        "source_family": inputs.src.checkpoint.model_type,
        "target_family": inputs.tgt.checkpoint.model_type,
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


def model_card(report: dict) -> str:
    s, lm = report["summary"], report["layer_map"]
    skipped = s["skipped_when_run"] + s["skipped_when_planned"]
    return f"""---
base_model: {report["target_model"]}
library_name: peft
tags:
- lora
- crosslora
---

# LoRA adapter transferred with crosslora

This adapter was **not trained** on `{report["target_model"]}`. It was transferred without data
or training from an adapter for `{report["source_model"]}` (`{report["source_adapter"]}`) by
crosslora {report["crosslora_version"]}, method `{report["method"]}`.

- Layer map: `{lm["kind"]}`, {lm["source_layers"]} source -> {lm["target_layers"]} target layers,
  {len(lm["pairs"])} matched.
- Modules: {s["transferred"]} transferred, {skipped} skipped (reasons in `transfer_report.json`).
{_fidelity_line(report)}
How much of the source adapter's effect survives a transfer varies by pair and method; measure
it on your task before relying on it (for example with `crosslora eval`).

Load it as any PEFT adapter:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder>")
```
"""
