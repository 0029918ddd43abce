"""atomic_write: the target is replaced only on success; failures leave no trace and the old file intact."""
from __future__ import annotations

import os
import stat

import pytest

from core.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def _litter(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_bytes_and_text(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01abc")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01abc"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert _litter(tmp_path) == []


def test_replaces_existing_file(tmp_path):
    target = tmp_path / "x"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new contents")
        assert target.read_bytes() == b"old"           # not visible before success
        assert len(_litter(tmp_path)) == 1             # the temp file lives in the target folder
    assert target.read_bytes() == b"new contents"
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_no_file_and_no_litter(tmp_path, exc):
    target = tmp_path / "out.gguf"
    with pytest.raises(type(exc)):
        with atomic_write(target) as f:
            f.write(b"x" * 100_000)
            raise exc
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_existing_target(tmp_path):
    target = tmp_path / "out.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise ValueError("produce failed")
    assert target.read_bytes() == b"precious"
    assert _litter(tmp_path) == []


def test_new_file_mode_follows_umask_and_existing_mode_is_kept(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new", b"1")
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o644   # not mkstemp's 0600
        (tmp_path / "old").write_bytes(b"0")
        os.chmod(tmp_path / "old", 0o640)
        atomic_write_bytes(tmp_path / "old", b"2")
        assert stat.S_IMODE((tmp_path / "old").stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_relative_path_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_bytes("rel.bin", b"ok")
    assert (tmp_path / "rel.bin").read_bytes() == b"ok"
