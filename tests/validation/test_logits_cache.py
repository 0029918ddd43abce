"""The baseline log-prob cache: keys, round trip, atomic publication, rejection of damaged entries."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from validation.logits_cache import CacheKey, LogitsCache, tokens_sha256

KEY = CacheKey("a" * 64, "b" * 64, 256, "0.1.0", tokens_sha256([[1, 2, 3]]))


def test_digest_depends_on_every_field():
    digests = {KEY.digest()}
    for f, v in (("baseline_sha256", "c" * 64), ("dataset_sha256", "d" * 64), ("max_tokens", 128),
                 ("tool_version", "0.2.0"), ("tokens_sha256", tokens_sha256([[1, 2, 4]]))):
        digests.add(dataclasses.replace(KEY, **{f: v}).digest())
    assert len(digests) == 6


def test_tokens_sha256_separates_samples():
    assert tokens_sha256([[1, 2], [3]]) != tokens_sha256([[1], [2, 3]])


def test_round_trip(tmp_path):
    cache = LogitsCache(tmp_path)
    assert cache.lookup(KEY) is None
    rows = [np.random.default_rng(i).normal(size=(n, 7)).astype(np.float16) for i, n in enumerate((3, 0, 5))]
    with cache.writer(KEY, 7) as w:
        for r in rows:
            w.append(r)
    hit = cache.lookup(KEY)
    assert hit is not None and hit.rows.shape == (8, 7)
    for i, r in enumerate(rows):
        assert np.array_equal(hit.sample(i), r)
    assert cache.lookup(dataclasses.replace(KEY, max_tokens=1)) is None


def test_failed_write_publishes_nothing(tmp_path):
    cache = LogitsCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.writer(KEY, 4) as w:
            w.append(np.zeros((2, 4), np.float16))
            raise RuntimeError("model crashed")
    assert cache.lookup(KEY) is None
    assert list((tmp_path / "logits").iterdir()) == []


def test_truncated_entry_is_a_miss(tmp_path):
    cache = LogitsCache(tmp_path)
    with cache.writer(KEY, 4) as w:
        w.append(np.zeros((2, 4), np.float16))
    data = tmp_path / "logits" / f"{KEY.digest()}.f16"
    data.write_bytes(data.read_bytes()[:-2])
    assert cache.lookup(KEY) is None


def test_wrong_width_rejected(tmp_path):
    with LogitsCache(tmp_path).writer(KEY, 4) as w:
        with pytest.raises(ValueError):
            w.append(np.zeros((2, 5), np.float16))
