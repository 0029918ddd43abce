"""Open PyTorch state dicts (.bin/.pt/.pth, or a sharded pytorch_model.bin index) safely: weights-only unpickling."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.errors import CheckpointError, UnsafeCheckpointError
from quant.loaders.base import Checkpoint, SourceTensor, release_mapped
from quant.loaders.safetensors_src import collect_sharded, load_config

INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_NAME = "pytorch_model.bin"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _load_state_dict(path: Path) -> tuple[dict, bool]:
    """torch.load with weights_only=True (never runs pickled code), memory-mapped for zip-format files; returns the
    state dict and whether its tensors live in that (read-only, private) file mapping."""
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped and is read whole
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeCheckpointError(
            f"{path}: refused: this pickle needs to run code to load (not a plain weights file)"
            + (f" [{detail}]" if detail else "") + "; it was not executed. Convert it to safetensors in a "
            "trusted environment") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (corrupt or truncated?): {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj, mmap


def _reader(t: torch.Tensor, mapped: bool):
    def read() -> np.ndarray:
        x = t.detach()
        out = x.numpy().copy() if x.dtype == torch.float32 else x.to(torch.float32).contiguous().numpy()
        if mapped:  # copied out of the memory-mapped file: drop its pages from this process's resident set
            storage = x.untyped_storage()
            release_mapped(storage.data_ptr(), storage.nbytes())
        return out
    return read


def _tensors_of(path: Path, loaded: tuple[dict, bool]) -> list[SourceTensor]:
    sd, mapped = loaded
    out = []
    for name, t in sd.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor; only flat state dicts are supported")
        dtype = _DTYPES.get(t.dtype)
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                "only float32, float16 and bfloat16 sources are supported")
        out.append(SourceTensor(name, tuple(int(d) for d in t.shape), dtype, _reader(t, mapped)))
    return out


def open_torch_checkpoint(path: "str | os.PathLike[str]") -> Checkpoint:
    """Open a PyTorch state dict file, or an HF folder with pytorch_model.bin or a sharded index; pickles that
    would execute code raise UnsafeCheckpointError without running anything. Tensors keep state-dict order."""
    folder, files, tensors = collect_sharded(path, SINGLE_NAME, INDEX_NAME,
                                             lambda f: _tensors_of(f, _load_state_dict(f)))
    return Checkpoint(path=Path(path), kind="torch", files=files, tensors=tensors, config=load_config(folder))
