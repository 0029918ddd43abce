"""A GGUF metadata key/value with its explicit GGUF value type, as it travels from a source to the writer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf.constants import GGUFValueType


@dataclass(frozen=True)
class KV:
    """One metadata entry; `sub_type` is the element type when `vtype` is ARRAY."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None
