"""Reading a checkpoint tensor by tensor keeps only about one tensor resident: the GGUF and PyTorch (mmap) loaders
drop the mapped pages of each tensor once it is copied out (the file's pages would otherwise all count in RSS), and
the values read again afterwards are the same."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quant.gguf_writer import TensorSpec, write_gguf
from quant.loaders import open_checkpoint

_MB = 1 << 20


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, mine = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            mine = line.rstrip().endswith(str(path))
        elif mine and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def _tensors(n: int = 6, rows: int = 512, cols: int = 1024) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"blk.{i}.w": rng.standard_normal((rows, cols)).astype(np.float16) for i in range(n)}  # 1 MiB each


def _read_all_and_check(path: Path, want: dict[str, np.ndarray]) -> None:
    with open_checkpoint(path) as ck:
        for t in ck.tensors:
            np.testing.assert_array_equal(t.read(), want[t.name].astype(np.float32))
        assert _mapped_rss(path.resolve()) < 2 * _MB / 8  # ~6 MiB read, at most a few boundary pages stay
        for t in ck.tensors:  # pages dropped, not lost: a second read faults them back in from the file
            np.testing.assert_array_equal(t.read(), want[t.name].astype(np.float32))


def test_gguf_reader_drops_each_tensors_pages(tmp_path):
    want = _tensors()
    path = tmp_path / "m.gguf"
    specs = [TensorSpec(k, v.shape, "F16", (lambda v=v: v.reshape(-1).view(np.uint8))) for k, v in want.items()]
    write_gguf(path, kv=[], tensors=specs)
    _read_all_and_check(path, want)


def test_torch_mmap_reader_drops_each_tensors_pages(tmp_path):
    want = _tensors()
    path = tmp_path / "pytorch_model.bin"
    torch.save({k: torch.from_numpy(v) for k, v in want.items()}, path)
    _read_all_and_check(path, want)
