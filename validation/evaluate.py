"""The evaluation engine: score a quantized candidate GGUF against its baseline on a text dataset.

Two passes with one model in memory at a time: the baseline's log-probs are computed once per cache key and stored
in llama-perplexity's compact uint16 form (validation.logits_cache), then the candidate streams over the samples in batches and is
scored against them (docs/EVALUATION.md: the format, its measured error, the memory bound). Returns
an EvalReport with perplexity, KL divergence, top-1 agreement and accuracy overall and per category, plus the
per-tensor weight error. Metric definitions: docs/METRICS.md.
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import CheckpointError, QuantGateError
from core.hashing import checkpoint_sha256
from core.progress import ProgressFn
from core.version import __version__
from quant.gguf_split import gguf_files, open_gguf
from quant.loaders import open_checkpoint
from runtime.backends import BACKENDS, LogitsBackend, is_gguf, open_backend
from runtime.datasets import load_dataset
from runtime.layer_stream import stream_logits, supports
from runtime.tokenize import tokenize_samples
from validation.eval_report import EvalReport, ModelRef, Timings
from validation.logits_cache import (
    CachedLogProbs,
    CacheKey,
    LogitsCache,
    compress,
    score_against,
    tokens_sha256,
)
from validation.metrics import MetricsAccumulator, log_softmax
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

        with open_gguf(path) as g:  # a split GGUF: every part
            bad = sorted({t.qtype for t in g.tensors} - {"F32", "F16", "BF16"})
        if bad:
            raise CheckpointError(f"{path}: a baseline GGUF must be F32/F16/BF16, but it holds {', '.join(bad)} tensors")
    elif not path.is_dir():
        raise CheckpointError(f"{path}: the baseline must be an HF model folder or an F32/F16/BF16 GGUF")


def _samples_and_tokens(baseline: Path, dataset: Any, max_tokens: int) -> tuple[Any, str, list, list[list[int]]]:
    ds, ds_path = _load_dataset(dataset)
    samples = list(ds.usable()) if hasattr(ds, "usable") else list(ds.samples)  # no empty or duplicate texts
    if not samples:
        raise QuantGateError(f"dataset {ds_path or '(in memory)'} has no samples")
    return ds, ds_path, samples, tokenize_samples(baseline, [s.text for s in samples], max_tokens)


def _n_vocab(model: Path) -> int:
    """Vocabulary size of a model (GGUF: token list or embedding rows; HF: config vocab_size)."""
    with open_checkpoint(model, allow_requantize=True) as ckpt:
        if ckpt.kind == "gguf":
            kv = {k.key: k.value for k in ckpt.gguf_kv}
            arch = kv.get("general.architecture")
            if kv.get(f"{arch}.vocab_size") is not None:
                return int(kv[f"{arch}.vocab_size"])
            if kv.get("tokenizer.ggml.tokens") is not None:
                return len(kv["tokenizer.ggml.tokens"])
            return int(ckpt.tensor("token_embd.weight").shape[0])
        n = (ckpt.config or {}).get("vocab_size")
        if n is None:
            raise CheckpointError(f"{model}: config.json has no vocab_size")
        return int(n)


def _check_args(backend: str, batch_size: int, *paths: Path) -> None:
    if backend not in BACKENDS:
        raise QuantGateError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if batch_size < 1:
        raise QuantGateError(f"batch_size must be at least 1, got {batch_size}")
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder")
        if not p.is_file() and not p.is_dir():
            raise CheckpointError(f"{p}: not a regular file or a folder")


def each_logits(backend: str, model: Path, token_ids: list[list[int]], on_logits: Callable[[int, np.ndarray], None],
                *, batch_size: int, max_tokens: int, notes: list[str], progress: ProgressFn | None = None,
                what: str = "") -> int:
    """Call on_logits(i, float32 logits (n_i, n_vocab)) for every sequence, in order, and return n_vocab. The torch
    backend runs layer by layer (runtime.layer_stream: one block's weights in memory) when the architecture has a
    streaming adapter, else it loads the whole model in float32 and says so in `notes`; llama.cpp runs the file."""
    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, what)

    if backend == "torch" and supports(model):
        def counted(i: int, lg: np.ndarray) -> None:
            on_logits(i, lg)
            if (i + 1) % batch_size == 0 or i + 1 == len(token_ids):
                report(i + 1, len(token_ids))   # per batch of sequences, as the batched backends report

        return stream_logits(model, token_ids, counted)
    if backend == "torch":
        notes.append(f"{model.name}: no layer-streaming adapter for its architecture; the whole model was loaded "
                     "in float32 (runtime.layer_stream)")
    runner: LogitsBackend | None = open_backend(backend, model, n_ctx=max_tokens)
    try:
        assert runner is not None
        n_vocab = runner.n_vocab
        for start in range(0, len(token_ids), batch_size):
            idx = range(start, min(start + batch_size, len(token_ids)))
            for i, lg in zip(idx, runner.logits([token_ids[i] for i in idx])):
                on_logits(i, lg)
            report(idx.stop, len(token_ids))
    finally:
        if runner is not None:
            runner.close()
        runner = None
        gc.collect()
    return n_vocab


def _baseline_pass(baseline: Path, token_ids: list[list[int]], key: CacheKey, cache: LogitsCache, batch_size: int,
                   progress: ProgressFn | None, notes: list[str]) -> tuple[CachedLogProbs, bool, float]:
    """(baseline records, cache hit, seconds). On a miss only the baseline model is in memory, and it is freed
    before returning; its records stream to the cache (or to memory when the cache folder is not writable)."""
    cached = cache.lookup(key)
    if cached is not None:
        return cached, True, 0.0
    t0 = time.perf_counter()
    n_vocab = _n_vocab(baseline)
    with cache.writer(key, n_vocab) as writer:
        def write(i: int, lg: np.ndarray) -> None:
            if lg.shape[-1] != n_vocab:
                raise QuantGateError(f"{baseline}: logits have {lg.shape[-1]} entries, the vocabulary {n_vocab}")
            targets = np.asarray(token_ids[i][1:], dtype=np.int64)
            writer.append(compress(log_softmax(lg[:-1]), targets))

        each_logits(key.backend, baseline, token_ids, write, batch_size=batch_size, max_tokens=key.max_tokens,
                    notes=notes, progress=progress, what="baseline")
    gc.collect()    # the baseline's weights go before the candidate loads
    seconds = time.perf_counter() - t0
    hit = cache.lookup(key)
    return (hit if hit is not None else writer.in_memory()), False, seconds


def cache_baseline(
    baseline: "str | os.PathLike[str]",
    dataset: Any,
    *,
    max_tokens: int = 256,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: "str | os.PathLike[str] | None" = None,
    progress: ProgressFn | None = None,
) -> tuple[CacheKey, bool]:
    """Run only the baseline pass of `evaluate` (nothing else in memory) and store its records in the cache:
    (the cache key, whether the entry was already there)."""
    baseline = Path(baseline)
    _check_args("torch", batch_size, baseline)
    _check_float_baseline(baseline)
    ds, _ds_path, _samples, token_ids = _samples_and_tokens(baseline, dataset, max_tokens)
    key = CacheKey(model_sha256(baseline), ds.sha256, int(max_tokens), __version__, tokens_sha256(token_ids),
                   "torch")
    _records, hit, _s = _baseline_pass(baseline, token_ids, key, LogitsCache(cache_dir), batch_size, progress, [])
    return key, hit


def _exact_pass(baseline: Path, candidate: Path, backend: str, token_ids: list[list[int]], samples: list,
                max_tokens: int, batch_size: int, overall: MetricsAccumulator,
                per_cat: dict[str, MetricsAccumulator], progress: ProgressFn | None) -> tuple[float, float]:
    """Both models in memory, full float64 log-probs compared: the reference for the cached path."""
    cand: LogitsBackend = open_backend(backend, candidate, n_ctx=max_tokens)
    base: LogitsBackend = open_backend("torch", baseline, n_ctx=max_tokens)
    t_base = t_cand = 0.0
    try:
        if cand.n_vocab != base.n_vocab:
            raise QuantGateError(f"vocabulary sizes differ: baseline {base.n_vocab}, candidate {cand.n_vocab}")
        for start in range(0, len(samples), batch_size):
            idx = range(start, min(start + batch_size, len(samples)))
            batch = [token_ids[i] for i in idx]
            t0 = time.perf_counter()
            base_lg = base.logits(batch)
            t1 = time.perf_counter()
            cand_lg = cand.logits(batch)
            t_base, t_cand = t_base + (t1 - t0), t_cand + (time.perf_counter() - t1)
            for i, lb, lc in zip(idx, base_lg, cand_lg):
                targets = np.asarray(token_ids[i][1:], dtype=np.int64)
                nb, nc = log_softmax(lb[:-1]), log_softmax(lc[:-1])
                overall.add(nb, nc, targets)
                per_cat.setdefault(samples[i].category, MetricsAccumulator()).add(nb, nc, targets)
            if progress is not None:
                progress(idx.stop, len(samples), "evaluate")
    finally:
        cand.close()
        base.close()
    return t_base, t_cand


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
    exact: bool = False,
) -> EvalReport:
    """Compare `candidate` (a GGUF) with `baseline` (HF folder or float GGUF) on `dataset` (a JSONL path or a
    runtime.datasets.Dataset): each sample is tokenized once with the baseline's tokenizer (BOS + at most
    max_tokens-1 text tokens).

    Two passes, one model in memory at a time: the baseline (torch, float32) runs once per cache key and leaves
    compact records on disk (llama-perplexity's uint16 log-probs) (validation.logits_cache), then the candidate runs in `backend` and is
    scored against them. `exact=True` instead holds both models and compares full float64 log-probs (the
    reference the cached path is measured against: docs/EVALUATION.md). `progress(done, total, what)` is called
    after each batch, what = "baseline" or "evaluate"."""
    t_start = time.perf_counter()
    baseline, candidate = Path(baseline), Path(candidate)
    _check_args(backend, batch_size, baseline, candidate)
    _check_float_baseline(baseline)
    ds, ds_path, samples, token_ids = _samples_and_tokens(baseline, dataset, max_tokens)
    key = CacheKey(model_sha256(baseline), ds.sha256, int(max_tokens), __version__, tokens_sha256(token_ids),
                   "torch")
    overall = MetricsAccumulator()
    per_cat: dict[str, MetricsAccumulator] = {}
    n_fed = sum(len(ids) for ids in token_ids)
    notes: list[str] = []
    if exact:
        t_base, t_cand = _exact_pass(baseline, candidate, backend, token_ids, samples, max_tokens, batch_size,
                                     overall, per_cat, progress)
        hit = False
    else:
        records, hit, t_base = _baseline_pass(baseline, token_ids, key, LogitsCache(cache_dir), batch_size, progress,
                                              notes)

        def score(i: int, lg: np.ndarray) -> None:
            if lg.shape[-1] != records.n_vocab:
                raise QuantGateError(f"vocabulary sizes differ: baseline {records.n_vocab}, candidate {lg.shape[-1]}")
            targets = np.asarray(token_ids[i][1:], dtype=np.int64)
            rec = records.sample(i)
            if rec.shape != (len(targets),):
                raise QuantGateError(f"cached baseline rows of sample {i} do not match its tokens")
            values = score_against(rec, log_softmax(lg[:-1]), targets)
            overall.add_tokens(*values[:4], targets, values[4])
            per_cat.setdefault(samples[i].category, MetricsAccumulator()).add_tokens(*values[:4], targets, values[4])

        t1 = time.perf_counter()
        each_logits(backend, candidate, token_ids, score, batch_size=batch_size, max_tokens=max_tokens, notes=notes,
                    progress=progress, what="evaluate")
        t_cand = time.perf_counter() - t1

    t3 = time.perf_counter()
    tensors = per_tensor_errors(baseline, candidate)
    t_tensors = time.perf_counter() - t3
    m = overall.result()
    timings = Timings(
        baseline_seconds=t_base,
        baseline_tokens_per_s=(n_fed / t_base) if not hit and t_base > 0 else None,
        candidate_seconds=t_cand,
        candidate_tokens_per_s=(n_fed / t_cand) if t_cand > 0 else None,
        tensor_error_seconds=t_tensors,
        total_seconds=time.perf_counter() - t_start,
        baseline_cache_hit=hit,
    )
    if not exact:
        notes.insert(0, "KL from the cached uint16 baseline log-probs (llama-perplexity's format; docs/EVALUATION.md)")
    if (dropped := len(ds.samples) - len(samples)):
        notes.append(f"{dropped} empty or duplicate samples skipped")
    if (short := sum(1 for ids in token_ids if len(ids) < 2)):
        notes.append(f"{short} samples have fewer than 2 tokens and contribute no scored token")
    return EvalReport(
        baseline=ModelRef(str(baseline), key.baseline_sha256),
        candidate=ModelRef(str(candidate), checkpoint_sha256(gguf_files(candidate))),
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
        cache_key="" if exact else key.digest(),
        notes=notes,
    )

