"""``matched``'s preparation of a pair as pair-cache entries (``crosslora.pair_cache``): the probe
texts, the activations at their aligned positions (one spool file and its index) and the bases'
chunk log-likelihoods of the calibration texts; then, one entry each, the fits made from those
activations (a ridge's Cholesky factor, a residual-stream map), which no adapter changes. What
identifies the probe's entry: both checkpoints' files, both tokenizers' files, the parameters
that decide the probe, and the versions and device type that decide its numbers; a fit's: the
probe's key, the ridge and which fit it is."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crosslora.arch.layout import Layout
from crosslora.io.spool import Parked, Spool
from crosslora.methods.matched.probe import Activations, Spilled
from crosslora.pair_cache import PAIR_CACHE_VERSION

ACTIVATIONS, PROBE, BASE_LL = "activations.bin", "probe.json", "base_ll.safetensors"
FIT, FIT_META = "fit.bin", "fit.json"
FITS_VERSION = 1  # raised when what a fit holds, or how it is made, changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def _files(folder: Path, names) -> list:
    return [[n, hashlib.sha256((folder / n).read_bytes()).hexdigest()]
            for n in names if (folder / n).is_file()]  # fmt: skip


def _model(layout: Layout) -> dict:
    ckpt = layout.checkpoint
    shards = sorted({ckpt.identity(k)["file"] for k in ckpt.keys()})
    files = []
    for f in shards:
        st = Path(f).stat()
        files.append([f, st.st_size, st.st_mtime_ns])
    return {"weights": files, "config": _files(ckpt.path, ["config.json"]),
            "tokenizer": _files(ckpt.path, TOKENIZER_FILES)}  # fmt: skip


def pair_key(src: Layout, tgt: Layout, probe: dict, device: torch.device) -> dict:
    """The entry's key: ``probe`` the parameters that decide the probe and its activations."""
    import transformers

    return {"version": PAIR_CACHE_VERSION, "method": "matched", "source": _model(src),
            "target": _model(tgt), "probe": probe, "device": device.type,
            "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip


@dataclass
class Entry:
    """A read entry: the texts, both sides' activations (reading from its spool file) and the
    bases' chunk log-likelihoods."""

    texts: list[str]
    acts: tuple[Activations, Activations]
    base_ll: tuple[torch.Tensor, torch.Tensor]
    spool: Spool


def write(folder: Path, texts: list[str], acts: tuple[Activations, Activations],
          base_ll: tuple[torch.Tensor, torch.Tensor]) -> None:  # fmt: skip
    """The probe file (texts, and where each activation lies in ``ACTIVATIONS``, which the
    activations were spilled to) and the log-likelihoods, into the staging ``folder``."""
    index = [[a.inputs.index(), a.residual.index()] for a in acts]  # type: ignore[attr-defined]
    (folder / PROBE).write_text(json.dumps({"texts": texts, "index": index}))
    save_file({"source": base_ll[0].contiguous(), "target": base_ll[1].contiguous()},
              str(folder / BASE_LL))  # fmt: skip


def read(folder: Path) -> Entry:
    probe = json.loads((folder / PROBE).read_text())
    spool = Spool.at(folder / ACTIVATIONS, write=False)
    acts = tuple(Activations(Spilled.restore(spool, ins), Spilled.restore(spool, res))
                 for ins, res in probe["index"])  # fmt: skip
    ll = load_file(str(folder / BASE_LL))
    return Entry(probe["texts"], acts, (ll["source"], ll["target"]), spool)  # type: ignore[arg-type]


def fits_key(pair_key: dict, alpha: float) -> dict:
    """What the fits' keys share: the probe's entry key ``pair_key`` and the ridge ``alpha``."""
    return {**pair_key, "fits": [FITS_VERSION, alpha]}


def fit_key(fits: dict, what: tuple) -> dict:
    """A fit's entry key: ``fits`` (``fits_key``) and ``what``, the fit's name within the pair
    (e.g. ``("in", 3, "attn_in")``)."""
    return {**fits, "fit": list(what)}


def write_fit(folder: Path, tensor: torch.Tensor, fit: float | None) -> None:
    """A fit's tensor (raw, as the spool writes it: no copy in memory) and, for a map, its
    residual ``fit``, into the staging ``folder``."""
    with Spool.at(folder / FIT, write=True) as spool:
        parked = spool.put(tensor)
    meta = {"shape": list(parked.shape), "dtype": str(parked.dtype).removeprefix("torch."),
            "fit": fit}  # fmt: skip
    (folder / FIT_META).write_text(json.dumps(meta))


def read_fit(folder: Path) -> tuple[torch.Tensor, float | None]:
    meta = json.loads((folder / FIT_META).read_text())
    parked = Parked(0, tuple(meta["shape"]), getattr(torch, meta["dtype"]))
    with Spool.at(folder / FIT, write=False) as spool:
        return spool.get(parked), meta["fit"]
