"""What ``matched`` sees between two base models, before any adapter (``inspect``'s default): the
probe text it reads, how much of it the two tokenizers align, and how well each of its maps
predicts the other model on held-out probe text (``methods.matched.sight``), set against what the
benchmark's pairs recovered (``odds``).

The probe is ``matched``'s own, made with its default parameters and kept in the pair cache, so a
transfer between the same two models afterwards reads it instead of making it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from crosslora.arch.layout import Layout
from crosslora.io.spool import Spool
from crosslora.layer_map import LayerMap
from crosslora.methods.matched import Matched, MatchedParams
from crosslora.methods.matched.probe import INPUT_SPACE
from crosslora.methods.matched.sight import sight
from crosslora.pair_cache import PairCache

SPACES = list(dict.fromkeys(INPUT_SPACE.values()))  # attn_in, attn_out, mlp_in, mlp_mid
MAPS = [f"read_{s}" for s in SPACES] + ["neurons", "stream"]


def inspect_matched(src: Layout, tgt: Layout, lmap: LayerMap, device: torch.device,
                    pair_dir: Path, progress: bool = True) -> dict:  # fmt: skip
    """The probe's figures, every layer pair's map qualities and their means over the layers."""
    method = Matched(MatchedParams())
    cache = PairCache(pair_dir)
    with Spool() as scratch:
        pair = method.prepare(src, tgt, device, scratch, cache=cache)
        assert pair.acts_s is not None and pair.acts_t is not None
        spaces = [s for s in SPACES if any(k[1] == s for k in pair.acts_s.inputs)
                  and any(k[1] == s for k in pair.acts_t.inputs)]  # fmt: skip
        bar = (lambda xs: tqdm(xs, desc="inspect (matched)", unit="layer")) if progress else None
        layers = sight(pair.acts_s, pair.acts_t, lmap, spaces, pair.rows_per_text,
                       method.params.alpha, device, bar)  # fmt: skip
    d = pair.diagnostics
    means = {m: round(sum(row[m] for row in layers) / len(layers), 4)
             for m in MAPS if all(m in row for row in layers)}  # fmt: skip
    return {
        "probe": {
            "texts": d["probe_texts"],
            "aligned_positions": d["probe_positions"],
            "aligned_share_source": round(d["probe_positions"] / d["probe_tokens_source"], 4),
            "aligned_share_target": round(d["probe_positions"] / d["probe_tokens_target"], 4),
            "prepared": d["pair_prepared"],
        },
        "layers": layers,
        "means": means,
    }


def format_matched(result: dict) -> str:
    """The matched part of ``inspect``'s printout."""
    p = result["probe"]
    lines = [
        f"probe text: {p['texts']} texts, {p['aligned_positions']} aligned positions "
        f"({100 * p['aligned_share_source']:.0f}% of the source's tokens, "
        f"{100 * p['aligned_share_target']:.0f}% of the target's; {_prepared(p)})",
        "held-out map quality (fitted on half the probe text, scored on the other half; "
        "1 = exact, 0 = nothing carried):",
        "  read_*: the target's inputs reproduce the source's features (lora_A); neurons: the "
        "gate/up output map; stream: the o/down write map",
    ]
    shown = [m for m in MAPS if m in result["means"]]
    lines.append("  layer     " + " ".join(f"{m.removeprefix('read_'):>8}" for m in shown))
    for row in result["layers"]:
        ls, lt = row["layer"]
        lines.append(f"  {ls:>3} -> {lt:<3}" + " ".join(f"{row[m]:8.3f}" for m in shown))
    lines.append("  mean      " + " ".join(f"{result['means'][m]:8.3f}" for m in shown))
    return "\n".join(lines)


def _prepared(probe: dict) -> str:
    return ("made now and kept in the pair cache" if probe["prepared"] == "here"
            else probe["prepared"])  # fmt: skip
