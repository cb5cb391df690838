"""crosslora: move a LoRA adapter from one base LLM to another, without data or training."""

from __future__ import annotations

__version__ = "0.1.0"
