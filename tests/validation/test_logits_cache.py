"""The baseline log-prob cache: keys, round trip, atomic publication, rejection of damaged entries."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from validation.logits_cache import CacheKey, LogitsCache, compress, record_dtype, tokens_sha256
from validation.metrics import log_softmax

KEY = CacheKey("a" * 64, "b" * 64, 256, "0.1.0", tokens_sha256([[1, 2, 3]]))


def test_digest_depends_on_every_field():
    digests = {KEY.digest()}
    for f, v in (("baseline_sha256", "c" * 64), ("dataset_sha256", "d" * 64), ("max_tokens", 128),
                 ("tool_version", "0.2.0"), ("tokens_sha256", tokens_sha256([[1, 2, 4]])), ("backend", "llama.cpp")):
        digests.add(dataclasses.replace(KEY, **{f: v}).digest())
    assert len(digests) == 7


def test_tokens_sha256_separates_samples():
    assert tokens_sha256([[1, 2], [3]]) != tokens_sha256([[1], [2, 3]])


def _records(rng, n, vocab=7):
    return compress(log_softmax(rng.normal(size=(n, vocab))), rng.integers(0, vocab, n))


def test_round_trip(tmp_path):
    cache = LogitsCache(tmp_path)
    assert cache.lookup(KEY) is None
    rows = [_records(np.random.default_rng(i), n) for i, n in enumerate((3, 0, 5))]
    with cache.writer(KEY, 7) as w:
        for r in rows:
            w.append(r)
    hit = cache.lookup(KEY)
    assert hit is not None and hit.rows.shape == (8,) and hit.n_vocab == 7
    for i, r in enumerate(rows):
        assert np.array_equal(hit.sample(i), r)
    assert cache.lookup(dataclasses.replace(KEY, max_tokens=1)) is None


def test_failed_write_publishes_nothing(tmp_path):
    cache = LogitsCache(tmp_path)
    with pytest.raises(RuntimeError):
        with cache.writer(KEY, 7) as w:
            w.append(_records(np.random.default_rng(0), 2))
            raise RuntimeError("model crashed")
    assert cache.lookup(KEY) is None
    assert list((tmp_path / "baseline").iterdir()) == []


def test_truncated_entry_is_a_miss(tmp_path):
    cache = LogitsCache(tmp_path)
    with cache.writer(KEY, 7) as w:
        w.append(_records(np.random.default_rng(0), 2))
    data, _meta = cache.paths(KEY)
    data.write_bytes(data.read_bytes()[:-2])
    assert cache.lookup(KEY) is None


def test_wrong_record_rejected(tmp_path):
    with LogitsCache(tmp_path).writer(KEY, 7) as w:
        with pytest.raises(ValueError):
            w.append(np.zeros(2, record_dtype(8)))
        with pytest.raises(ValueError):
            w.append(np.zeros((2, 5), np.float16))
