"""Checkpoint loaders: `open_checkpoint` picks the right one from what the path is (folder, extension, magic)."""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import CheckpointError
from quant.loaders.base import Checkpoint, SourceTensor, check_regular, open_regular

__all__ = ["Checkpoint", "SourceTensor", "open_checkpoint"]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _sniff(path: Path) -> str | None:
    try:
        with open_regular(path) as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file: {e.strerror or e}") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip format / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _kind_of(p: Path) -> tuple[str, Path]:
    if p.is_dir():
        names = {c.name for c in p.iterdir()}
        if "model.safetensors.index.json" in names or "model.safetensors" in names:
            return "safetensors", p
        if "pytorch_model.bin.index.json" in names or "pytorch_model.bin" in names:
            return "torch", p
        singles = [c for c in sorted(p.iterdir()) if c.suffix == ".safetensors" and c.is_file()]
        if len(singles) == 1:
            return "safetensors", singles[0]
        raise CheckpointError(
            f"{p}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
            "pytorch_model.bin.index.json in this folder")
    kind = _sniff(p)
    if kind == "gguf" or p.suffix == ".gguf":
        return "gguf", p
    if p.suffix == ".safetensors":
        return "safetensors", p
    if p.suffix in _TORCH_SUFFIXES:
        return "torch", p
    if kind is not None:
        return kind, p
    raise CheckpointError(f"{p}: unknown checkpoint format (expected a folder, .safetensors, .bin/.pt/.pth or .gguf)")


def open_checkpoint(path: "str | os.PathLike[str]", *, allow_requantize: bool = False) -> Checkpoint:
    """Open any supported checkpoint lazily: an HF folder (safetensors or PyTorch, single or sharded), a
    .safetensors file, a .bin/.pt/.pth state dict or a GGUF file (by magic). Errors are one clear CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if not p.is_dir():
        check_regular(p)  # a FIFO would block the first read forever, a device never ends
    kind, target = _kind_of(p)
    if kind == "safetensors":
        from quant.loaders.safetensors_src import (
            open_safetensors_checkpoint,  # lazy: one reader per format
        )
        return open_safetensors_checkpoint(target)
    if kind == "torch":
        from quant.loaders.torch_src import (
            open_torch_checkpoint,  # lazy: torch only for .bin/.pt inputs
        )
        return open_torch_checkpoint(target)
    from quant.loaders.gguf_src import (
        open_gguf_checkpoint,  # lazy: one reader per format
    )
    return open_gguf_checkpoint(target, allow_requantize=allow_requantize)
