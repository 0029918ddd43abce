"""core.regular_file: regular files open and read; FIFOs, devices and folders are refused without blocking."""
from __future__ import annotations

import os

import pytest

from core.regular_file import FileTooLargeError, NotRegularFileError, open_regular_file, read_regular_bytes


def test_regular_file_reads_whole(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"abc")
    with open_regular_file(p) as f:
        assert f.read() == b"abc"
    assert read_regular_bytes(p, 3) == b"abc"


def test_symlink_to_regular_file_is_followed(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "l").symlink_to(tmp_path / "a")
    assert read_regular_bytes(tmp_path / "l", 10) == b"x"


@pytest.mark.parametrize("make, kind", [
    (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "a FIFO"),   # would block a plain open() forever
    (lambda d: "/dev/zero", "a character device"),                     # would never end
    (lambda d: d, "a folder"),
])
def test_non_regular_refused_with_its_kind(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(NotRegularFileError) as e:
        open_regular_file(path)
    assert e.value.kind == kind and str(path) in str(e.value)
    with pytest.raises(NotRegularFileError):
        read_regular_bytes(path, 10)


def test_too_large_is_refused_by_size(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(b"x" * 11)
    with pytest.raises(FileTooLargeError) as e:
        read_regular_bytes(p, 10)
    assert (e.value.size, e.value.limit) == (11, 10)


def test_missing_file_is_the_open_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_regular_file(tmp_path / "nope")
