"""Hostile names for the injection tests: strings that are HTML, Markdown, Rich markup, ANSI escapes or newlines,
and a GGUF (rewritten with the project's own reader and writer) whose tensor names and general.name hold them."""
from __future__ import annotations

from pathlib import Path

HOSTILE = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "tick`s``here",
    "[link=https://evil.example]x[/link]",
    "y[/b]",
    "\x1b[31mred\x1b[0m",
    "line1\nline2",
)
#: One name holding every attack at once (general.name, file names).
ALL_IN_ONE = "evil " + " ".join(HOSTILE)


def hostile_copy(src: Path, out: Path, *, rename: int = len(HOSTILE)) -> Path:
    """`src` GGUF rewritten with general.name = ALL_IN_ONE and its first `rename` blk.* tensors renamed to
    `blk.<i>.` + one of HOSTILE each (data unchanged), written with quant.gguf_writer."""
    from quant.gguf_kv import KV
    from quant.gguf_reader import read_gguf
    from quant.gguf_writer import TensorSpec, write_gguf

    with read_gguf(src) as g:
        kv = [KV(k.key, ALL_IN_ONE, k.vtype, k.sub_type) if k.key == "general.name" else k for k in g.kv
              if k.key != "general.alignment"]
        names: dict[str, str] = {}
        blk = [t.name for t in g.tensors if t.name.startswith("blk.")]
        for i, (name, bad) in enumerate(zip(blk[:rename], HOSTILE)):
            names[name] = f"blk.{i}.{bad}"
        specs = [TensorSpec(names.get(t.name, t.name), t.shape, t.qtype,
                            (lambda t=t: g.tensor_data(t).copy())) for t in g.tensors]
        write_gguf(out, kv=kv, tensors=specs, alignment=g.alignment)
    return out
