"""Human- and machine-readable summary of a GGUF file: metadata, tensor table and size totals."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType

from quant.gguf_kv import KV
from quant.gguf_split import open_gguf_parts

MAX_ARRAY_SHOWN = 16        # longer arrays are summarized as "[N type]"
MAX_STRING_RENDERED = 120   # render() shortens longer strings (to_json keeps them whole)


@dataclass
class TensorRow:
    """One line of the tensor table."""

    name: str
    type: str
    shape: list[int]
    n_elements: int
    bytes: int
    bits_per_weight: float


@dataclass
class InspectReport:
    """Everything `quantgate inspect` shows about a GGUF file."""

    path: str
    version: int
    alignment: int
    file_size: int
    metadata: dict[str, Any]
    metadata_types: dict[str, str]
    tensors: list[TensorRow]
    totals: dict[str, Any] = field(default_factory=dict)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (strings with invalid UTF-8 are escaped)."""
        return json.dumps(asdict(self), indent=indent, ensure_ascii=True)

    def render(self, console: Any) -> None:
        """Print the report with rich tables on `console` (a rich.console.Console)."""
        from rich.table import Table

        console.print(
            f"[bold]{_printable(self.path)}[/bold]  GGUF v{self.version}, alignment {self.alignment}, "
            f"{self.file_size:,} bytes"
        )
        meta = Table(title="Metadata", show_lines=False)
        meta.add_column("key")
        meta.add_column("type")
        meta.add_column("value", overflow="fold")
        for k, v in self.metadata.items():
            meta.add_row(_printable(k), self.metadata_types[k], _printable(_short(v)))
        console.print(meta)
        tab = Table(title="Tensors")
        for col, just in (("name", "left"), ("type", "left"), ("shape", "left"), ("elements", "right"),
                          ("bytes", "right"), ("bpw", "right")):
            tab.add_column(col, justify=just)  # type: ignore[arg-type]
        for t in self.tensors:
            tab.add_row(_printable(t.name), t.type, "x".join(map(str, t.shape)), f"{t.n_elements:,}",
                        f"{t.bytes:,}", f"{t.bits_per_weight:.2f}")
        console.print(tab)
        tot = self.totals
        if tot.get("parts"):
            console.print(f"split GGUF: {len(tot['parts'])} parts: "
                          + ", ".join(_printable(Path(q["path"]).name) for q in tot["parts"]))
        per_type = ", ".join(f"{k}: {v}" for k, v in tot["tensors_per_type"].items())
        console.print(
            f"{tot['tensors']} tensors, {tot['parameters']:,} parameters, {tot['bytes']:,} bytes, "
            f"{tot['bits_per_weight']:.3f} bits/weight ({per_type})"
        )


def _printable(s: str) -> str:
    """Make surrogate-escaped bytes displayable and keep rich from reading [..] as markup."""
    from rich.markup import escape

    return escape(s.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= MAX_STRING_RENDERED else s[:MAX_STRING_RENDERED] + f"… ({len(s)} chars)"


def _type_name(kv: KV) -> str:
    if kv.vtype == GGUFValueType.ARRAY:
        return f"array[{GGUFValueType(kv.sub_type).name.lower()}]"
    return GGUFValueType(kv.vtype).name.lower()


def summarize_value(kv: KV) -> Any:
    """A JSON-friendly value; arrays longer than MAX_ARRAY_SHOWN become e.g. '[32000 strings]'."""
    v = kv.value
    if kv.vtype != GGUFValueType.ARRAY:
        return v.item() if isinstance(v, np.generic) else v
    n = len(v)
    if n > MAX_ARRAY_SHOWN:
        sub = GGUFValueType(kv.sub_type)
        return f"[{n} strings]" if sub == GGUFValueType.STRING else f"[{n} {sub.name.lower()}]"
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


def inspect_gguf(path: "str | os.PathLike[str]") -> InspectReport:
    """Read a GGUF file's metadata and tensor infos (not its data) into an InspectReport; for any part of a split
    GGUF, the whole set (metadata from the first part, every part's tensors, sizes summed, totals["parts"])."""
    parts = open_gguf_parts(path)
    try:
        g = parts[0]
        rows = [
            TensorRow(t.name, t.qtype, list(t.shape), t.n_elements, t.nbytes,
                      8.0 * t.nbytes / t.n_elements if t.n_elements else 0.0)
            for part in parts for t in part.tensors
        ]
        params = sum(r.n_elements for r in rows)
        nbytes = sum(r.bytes for r in rows)
        totals: dict[str, Any] = {
            "tensors": len(rows),
            "parameters": params,
            "bytes": nbytes,
            "bits_per_weight": 8.0 * nbytes / params if params else 0.0,
            "tensors_per_type": dict(Counter(r.type for r in rows).most_common()),
        }
        if len(parts) > 1:
            totals["parts"] = [{"path": str(q.path), "bytes": q.file_size, "tensors": len(q.tensors)} for q in parts]
        return InspectReport(
            str(g.path if len(parts) > 1 else Path(path)), g.version, g.alignment, sum(q.file_size for q in parts),
            {kv.key: summarize_value(kv) for kv in g.kv},
            {kv.key: _type_name(kv) for kv in g.kv},
            rows, totals,
        )
    finally:
        for q in parts:
            q.close()


__all__ = ["InspectReport", "TensorRow", "inspect_gguf", "summarize_value"]
