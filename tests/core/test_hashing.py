"""core.hashing: streamed file SHA-256, the multi-file combination rule, and the (path, size, mtime) cache."""
from __future__ import annotations

import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from core.hashing import checkpoint_sha256, file_sha256


def test_file_sha256_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "cache" / "sha256_cache.json").is_file()
    # a cached entry is trusted while size and mtime are unchanged ...
    st_ = f.stat()
    f.write_bytes(b"x" * len(data))
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    # ... and re-hashed when the mtime (or size) changes
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))
    assert file_sha256(f) == hashlib.sha256(b"x" * len(data)).hexdigest()
    f.write_bytes(b"short")
    assert file_sha256(f) == hashlib.sha256(b"short").hexdigest()


def test_checkpoint_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "m" / "b.safetensors", tmp_path / "m" / "a.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert checkpoint_sha256([a]) == hashlib.sha256(b"one").hexdigest()
    lines = "".join(f"{n}\0{hashlib.sha256(d).hexdigest()}\n" for n, d in [("a.safetensors", b"two"),
                                                                         ("b.safetensors", b"one")])
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert checkpoint_sha256([a, b]) == checkpoint_sha256([b, a]) == expected


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=4096))
def test_matches_hashlib(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("h")
    os.environ["QUANTGATE_CACHE_DIR"] = str(d / "cache")
    try:
        f = d / "f"
        f.write_bytes(data)
        assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    finally:
        del os.environ["QUANTGATE_CACHE_DIR"]
