"""The evaluation engine: score a quantized candidate GGUF against its baseline on a text dataset.

Streams over samples in batches (never all logits in memory), caches the baseline's log-probs on disk, and returns
an EvalReport with perplexity, KL divergence, top-1 agreement and accuracy overall and per category, plus the
per-tensor weight error. Metric definitions: docs/METRICS.md.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CheckpointError, QuantGateError
from core.hashing import checkpoint_sha256, file_sha256
from core.progress import ProgressFn
from core.version import __version__
from quant.gguf_reader import read_gguf
from quant.loaders import open_checkpoint
from runtime.backends import BACKENDS, LogitsBackend, is_gguf, open_backend
from runtime.datasets import load_dataset
from runtime.tokenize import tokenize_samples
from validation.eval_report import EvalReport, ModelRef, Timings
from validation.logits_cache import CacheKey, LogitsCache, tokens_sha256
from validation.metrics import MetricsAccumulator, renormalize, storage_log_probs
from validation.tensor_error import per_tensor_errors

DEFAULT_BATCH_SIZE = 8


def model_sha256(path: "str | os.PathLike[str]") -> str:
    """Content identity of a model: core.hashing.checkpoint_sha256 over the files its loader reads."""

    with open_checkpoint(Path(path), allow_requantize=True) as ckpt:
        return checkpoint_sha256(ckpt.files)


def _load_dataset(dataset: Any) -> tuple[Any, str]:
    if hasattr(dataset, "samples") and hasattr(dataset, "sha256"):
        return dataset, str(getattr(dataset, "path", None) or "")

    return load_dataset(Path(dataset)), str(dataset)


def _check_float_baseline(path: Path) -> None:

    if is_gguf(path):

        with read_gguf(path) as g:
            bad = sorted({t.qtype for t in g.tensors} - {"F32", "F16", "BF16"})
        if bad:
            raise CheckpointError(f"{path}: a baseline GGUF must be F32/F16/BF16, but it holds {', '.join(bad)} tensors")
    elif not path.is_dir():
        raise CheckpointError(f"{path}: the baseline must be an HF model folder or an F32/F16/BF16 GGUF")


def evaluate(
    baseline: "str | os.PathLike[str]",
    candidate: "str | os.PathLike[str]",
    dataset: Any,
    *,
    backend: str = "torch",
    max_tokens: int = 256,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: "str | os.PathLike[str] | None" = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Compare `candidate` (a GGUF) with `baseline` (HF folder or float GGUF) on `dataset` (a JSONL path or a
    runtime.datasets.Dataset): each sample is tokenized once with the baseline's tokenizer (BOS + at most
    max_tokens-1 text tokens), the baseline runs in torch (or comes from the log-prob cache), the candidate in
    `backend`; metrics are aggregated per token as batches stream by, and `progress(done, total, "evaluate")` is called after
    each batch."""
    t_start = time.perf_counter()
    baseline, candidate = Path(baseline), Path(candidate)
    if backend not in BACKENDS:
        raise QuantGateError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if batch_size < 1:
        raise QuantGateError(f"batch_size must be at least 1, got {batch_size}")
    for p in (baseline, candidate):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder")
    _check_float_baseline(baseline)
    ds, ds_path = _load_dataset(dataset)
    samples = list(ds.usable()) if hasattr(ds, "usable") else list(ds.samples)  # no empty or duplicate texts
    if not samples:
        raise QuantGateError(f"dataset {ds_path or '(in memory)'} has no samples")


    token_ids = tokenize_samples(baseline, [s.text for s in samples], max_tokens)
    key = CacheKey(model_sha256(baseline), ds.sha256, int(max_tokens), __version__, tokens_sha256(token_ids))
    cache = LogitsCache(cache_dir)
    cached = cache.lookup(key)

    cand: LogitsBackend = open_backend(backend, candidate, n_ctx=max_tokens)
    base: LogitsBackend | None = None
    try:
        if cached is None:
            base = open_backend("torch", baseline, n_ctx=max_tokens)
            n_vocab = base.n_vocab
        else:
            n_vocab = int(cached.rows.shape[1])
        if cand.n_vocab != n_vocab:
            raise QuantGateError(f"vocabulary sizes differ: baseline {n_vocab}, candidate {cand.n_vocab}")
        overall = MetricsAccumulator()
        per_cat: dict[str, MetricsAccumulator] = {}
        t_base = t_cand = 0.0
        n_fed = sum(len(ids) for ids in token_ids)
        with (cache.writer(key, n_vocab) if cached is None else contextlib.nullcontext()) as writer:
            for start in range(0, len(samples), batch_size):
                idx = range(start, min(start + batch_size, len(samples)))
                batch = [token_ids[i] for i in idx]
                t0 = time.perf_counter()
                if cached is None:
                    assert base is not None
                    base_lp = [storage_log_probs(lg[:-1]) for lg in base.logits(batch)]
                    if writer is not None:
                        for lp in base_lp:
                            writer.append(lp)
                else:
                    base_lp = [np.asarray(cached.sample(i)) for i in idx]
                t1 = time.perf_counter()
                cand_lp = [storage_log_probs(lg[:-1]) for lg in cand.logits(batch)]
                t2 = time.perf_counter()
                t_base, t_cand = t_base + (t1 - t0), t_cand + (t2 - t1)
                for i, lb, lc in zip(idx, base_lp, cand_lp):
                    targets = np.asarray(token_ids[i][1:], dtype=np.int64)
                    if lb.shape != (len(targets), n_vocab):
                        raise QuantGateError(f"cached baseline rows of sample {i} do not match its tokens")
                    nb, nc = renormalize(lb), renormalize(lc)
                    overall.add(nb, nc, targets)
                    per_cat.setdefault(samples[i].category, MetricsAccumulator()).add(nb, nc, targets)
                if progress is not None:
                    progress(idx.stop, len(samples), "evaluate")
    finally:
        cand.close()
        if base is not None:
            base.close()

    t3 = time.perf_counter()
    tensors = per_tensor_errors(baseline, candidate)
    t_tensors = time.perf_counter() - t3
    m = overall.result()
    timings = Timings(
        baseline_seconds=t_base,
        baseline_tokens_per_s=(n_fed / t_base) if cached is None and t_base > 0 else None,
        candidate_seconds=t_cand,
        candidate_tokens_per_s=(n_fed / t_cand) if t_cand > 0 else None,
        tensor_error_seconds=t_tensors,
        total_seconds=time.perf_counter() - t_start,
        baseline_cache_hit=cached is not None,
    )
    notes = []
    if (dropped := len(ds.samples) - len(samples)):
        notes.append(f"{dropped} empty or duplicate samples skipped")
    if (short := sum(1 for ids in token_ids if len(ids) < 2)):
        notes.append(f"{short} samples have fewer than 2 tokens and contribute no scored token")
    return EvalReport(
        baseline=ModelRef(str(baseline), key.baseline_sha256),
        candidate=ModelRef(str(candidate), file_sha256(candidate)),
        dataset_path=ds_path,
        dataset_sha256=ds.sha256,
        backend=backend,
        max_tokens=int(max_tokens),
        n_samples=len(samples),
        n_tokens=m.n_tokens,
        overall=m,
        per_category={c: per_cat[c].result() for c in sorted(per_cat)},
        per_tensor=tensors,
        timings=timings,
        tool_version=__version__,
        cache_key=key.digest(),
        notes=notes,
    )

