"""Sensitivity profile: for every quantizable tensor and candidate type, the size in bytes, the cheap error
estimate, and (optionally) the measured effect on the model output; then the chosen type per tensor.

Definitions (docs/ANALYZER.md):
* est(t, T) = sum_ij w_j (W_ij - Q_T(W)_ij)^2 / sum_ij w_j W_ij^2, with w_j the imatrix value of input column j
  (mean squared activation; all ones for tensors without an entry, e.g. token_embd). Under a diagonal activation
  covariance this is E||(W - Q(W))x||^2 / E||Wx||^2: the relative output error of that matmul.
* measured(t, T): the whole model with only tensor t replaced by Q_T(W), run on a calibration subsample; we keep the
  mean per-token KL divergence of the next-token distribution vs the unquantized model (nats) and the mean squared
  logit difference (output MSE).
* gain(t) = exp(median_T log(kld(t, T) / est(t, T))), pred(t, T) = gain(t) * est(t, T): the predicted KLD
  contribution the budget policy sums (1 when nothing is measured).
Quantization is row-wise, so Q commutes with the Q/K row permutation and the transformers weights are quantized
as they are; the result is what the pipeline writes for the same type and imatrix.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from analyzer.cache import CacheKey, CalibrationCache
from analyzer.collect import collect_imatrix
from analyzer.param_slots import ParamSlot, param_slots
from analyzer.stream_measure import STREAM_VERSION, can_stream, rel_weight_error, streamed_sweep
from analyzer.policy import (
    CANDIDATE_TYPES,
    BudgetPolicy,
    Choice,
    Item,
    Option,
    ThresholdPolicy,
    choose_budget,
    choose_threshold,
    override_choices,
)
from core.atomic import atomic_write
from core.errors import QuantGateError
from core.hashing import canonical_json, checkpoint_sha256
from core.memory import release_free_memory
from core.progress import ProgressFn
from core.version import __version__
from quant.fingerprint import weights_fingerprint
from quant.formats import get_qtype
from quant.imatrix import Imatrix, ImatrixEntry
from quant.loaders import open_checkpoint
from quant.mixes import allows_quantization, current_type
from quant.model_plan import plan_model
from runtime.backends.torch_backend import load_torch_model
from runtime.datasets import load_dataset
from runtime.layer_stream import LayerStream, hf_config
from runtime.tokenize import calibration_chunks

PROFILE_SCHEMA = 1
#: Matmul precision of the imatrix a profile collects for itself (analyzer.collect; docs/ANALYZER.md).
IMATRIX_MATMUL = "bfloat16"
#: How the per-(tensor, type) output effect is measured (docs/ANALYZER.md).
MEASURE_MODES = ("stream", "exact")


@dataclass
class TypeStats:
    """One tensor at one candidate type."""

    size_bytes: int
    est_error: float
    measured_kld: float | None = None
    measured_mse: float | None = None
    predicted: float | None = None
    block_err: float | None = None


@dataclass
class TensorProfile:
    """One GGUF tensor: its candidates (empty when llama.cpp keeps it unquantized) and the choice made."""

    name: str
    shape: list[int]
    n_params: int
    source_type: str
    quantizable: bool
    candidates: dict[str, TypeStats] = field(default_factory=dict)
    gain: float | None = None
    chosen: str | None = None
    reason: str = ""

    def size_of(self, qtype: str) -> int:

        return get_qtype(qtype).nbytes(tuple(self.shape))


@dataclass
class Profile:
    """A model's sensitivity report (JSON); with `policy` applied it fixes every tensor's type."""

    model: dict[str, Any]
    calibration: dict[str, Any]
    imatrix: dict[str, Any]
    measure: dict[str, Any] | None
    candidate_types: list[str]
    tensors: list[TensorProfile]
    validation: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] | None = None
    overrides: list[list[str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tool_version: str = ""
    schema_version: int = PROFILE_SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def save(self, path: "str | os.PathLike[str]") -> None:
        """Write the JSON report atomically."""

        with atomic_write(path) as fh:
            fh.write((self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Profile":
        """Read a JSON report written by save()."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QuantGateError(f"{path}: cannot read profile: {e}") from None
        if d.get("schema_version") != PROFILE_SCHEMA:
            raise QuantGateError(f"{path}: profile schema {d.get('schema_version')} is not {PROFILE_SCHEMA}")
        tensors = [TensorProfile(**{**t, "candidates": {k: TypeStats(**v) for k, v in t["candidates"].items()}})
                   for t in d.pop("tensors")]
        return cls(tensors=tensors, **d)

    def sha256(self) -> str:
        """SHA-256 of the bytes save() writes (so it matches `sha256sum profile.json`)."""
        return hashlib.sha256((self.to_json() + "\n").encode("utf-8")).hexdigest()

    def chosen_types(self) -> dict[str, str]:
        """GGUF name -> type for every tensor (unquantizable ones keep their source type)."""
        if any(t.quantizable and t.chosen is None for t in self.tensors):
            raise QuantGateError("profile has no choices yet: apply a policy first (quantgate profile --policy ...)")
        return {t.name: (t.chosen if t.quantizable else t.source_type) for t in self.tensors}


#: Files beside HF weights that change what a forward pass computes or how calibration text is tokenized.
_MODEL_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
#: transformers config fields that change what the forward pass computes (the rest, e.g. max_position_embeddings
#: or token ids, do not change the activations of a calibration batch).
_FORWARD_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                   "hidden_act", "attention_bias", "rope_parameters", "sliding_window", "use_sliding_window")


def _f32(v: Any) -> Any:
    """Floats as float32 values (GGUF stores hyperparameters in float32), recursively."""
    if isinstance(v, float):
        return float(np.float32(v))
    if isinstance(v, dict):
        return {k: _f32(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_f32(x) for x in v]
    return v


def forward_config(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The config fields the forward pass depends on, normalized so an HF folder and its GGUF agree."""
    cfg = hf_config(path)
    out = {k: _f32(getattr(cfg, k, None)) for k in _FORWARD_FIELDS}
    if not out.get("use_sliding_window"):
        out["sliding_window"] = None
    return out


def model_identity(ckpt) -> str:
    """The model's cache identity. Normally the weights fingerprint (quant.fingerprint: one value for an HF folder
    and its F32/F16/BF16 GGUFs) plus the forward-relevant config, so both containers share cache rows (the
    tokenizer is covered by the token ids in each key). Where no fingerprint exists (a GGUF that cannot be mapped
    back): checkpoint_sha256 over the weight files plus, for HF folders, the config and tokenizer files."""
    fp = weights_fingerprint(ckpt.path)
    if fp is not None:
        try:
            return hashlib.sha256(canonical_json({"weights": fp, "forward": forward_config(ckpt.path)}).encode()
                                  ).hexdigest()
        except (ValueError, OSError, KeyError):
            pass
    files = [Path(f) for f in ckpt.files]
    folder = Path(ckpt.path) if Path(ckpt.path).is_dir() else Path(ckpt.path).parent
    if ckpt.kind != "gguf":
        files += [folder / n for n in _MODEL_SIDE_FILES if (folder / n).is_file() and folder / n not in files]
    return checkpoint_sha256(files)


def imatrix_digest(imat: Imatrix) -> str:
    """Content identity of an importance matrix (entries, counts, chunk metadata), independent of file format."""
    h = hashlib.sha256(f"{imat.is_legacy}\n{imat.chunk_count}\n{imat.chunk_size}\n".encode())
    for name in sorted(imat.entries):
        e = imat.entries[name]
        h.update(name.encode("utf-8") + b"\0")
        h.update(e.sums.astype("<f4").tobytes() + b"\0" + e.counts.astype("<f4").tobytes())
    return h.hexdigest()


def _imatrix_to_arrays(imat: Imatrix) -> dict[str, np.ndarray]:
    arrays = {"__meta__": np.array([imat.chunk_count, imat.chunk_size], np.int64)}
    for i, (name, e) in enumerate(sorted(imat.entries.items())):
        arrays[f"n{i}"] = np.frombuffer(name.encode("utf-8"), np.uint8)
        arrays[f"s{i}"], arrays[f"c{i}"] = e.sums, e.counts
    return arrays


def _imatrix_from_arrays(a: dict[str, np.ndarray], datasets: list[str]) -> Imatrix:
    n = (len(a) - 1) // 3
    entries = {bytes(a[f"n{i}"]).decode("utf-8"): ImatrixEntry(a[f"s{i}"], a[f"c{i}"]) for i in range(n)}
    return Imatrix(entries, datasets, int(a["__meta__"][0]), int(a["__meta__"][1]))


def cached_imatrix(model: Path, calib: Path, model_sha: str, *, chunk_size: int, n_chunks: int | None,
                   cache: CalibrationCache | None, tool_version: str, process_output: bool = True,
                   matmul_dtype: str = "float32", progress: ProgressFn | None = None) -> Imatrix:
    """The collected imatrix of (model, calibration set, config), from the cache or collected (and stored;
    the collection reports to `progress`). The key holds the token ids fed (the tokenizer's effect), so an HF
    folder and its GGUF share the entry, and the matmul precision when it is not float32 (analyzer.collect)."""

    ds = load_dataset(calib)
    toks = calibration_chunks(model, [s.text for s in ds.usable()], chunk_size, n_chunks)
    key = CacheKey(model_sha, ds.sha256, "imatrix",
                   {"chunk_size": chunk_size, "n_chunks": n_chunks, "process_output": process_output,
                    "tokens": tokens_sha256(toks.chunks),
                    **({"matmul": matmul_dtype} if matmul_dtype != "float32" else {})}, tool_version)
    hit = cache.get_arrays(key) if cache is not None else None
    if hit is not None:
        return _imatrix_from_arrays(hit, [calib.name])
    imat = collect_imatrix(model, [], chunk_size=chunk_size, n_chunks=n_chunks, process_output=process_output,
                           dataset_name=calib.name, tokens=toks, matmul_dtype=matmul_dtype, progress=progress)
    if cache is not None:
        cache.put_arrays(key, _imatrix_to_arrays(imat))
    return imat


def tokens_sha256(chunks: Sequence[Sequence[int]]) -> str:
    """SHA-256 of token id chunks (int64 length, then int32 ids, per chunk)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(np.int64(len(c)).tobytes())
        h.update(np.asarray(c, dtype="<i4").tobytes())
    return h.hexdigest()


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    r = spearmanr(np.asarray(a, float), np.asarray(b, float)).statistic
    return None if not np.isfinite(r) else float(r)


class _Measurer:
    """Runs the whole model with one weight swapped, against cached baseline log-probs of a calibration subsample
    (the exact reference mode: one full forward pass per (tensor, type))."""

    def __init__(self, model_path: Path, chunks: list[list[int]]) -> None:
        import torch

        self.torch = torch
        self.batch = torch.tensor(chunks, dtype=torch.long)
        self.model = load_torch_model(model_path)
        self.base_logits = self._logits()
        self.base_lp = torch.log_softmax(self.base_logits, dim=-1)

    def _logits(self):
        with self.torch.inference_mode():
            return self.model(input_ids=self.batch, use_cache=False).logits.float()

    def measure(self, slot: ParamSlot, new_value: np.ndarray) -> tuple[float, float]:
        """(mean per-token KLD(base || quantized), mean squared logit difference) with `slot` (a 2-D parameter or
        a fused expert tensor, analyzer.param_slots) set to new_value; MoE blocks route with their real router."""
        torch = self.torch
        old = slot.param.data.clone()
        slot.write(new_value)
        try:
            logits = self._logits()
        finally:
            with torch.no_grad():
                slot.param.data.copy_(old)
        lq = torch.log_softmax(logits, dim=-1)
        kld = (self.base_lp.exp() * (self.base_lp - lq)).sum(-1).mean().item()
        mse = ((logits - self.base_logits) ** 2).mean().item()
        return max(float(kld), 0.0), float(mse)


def _quant_dequant(x: np.ndarray, qtype: str, w: np.ndarray | None) -> np.ndarray:
    import quant  # lazy: the numba kernels load at first quantization

    if qtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if x.ndim == 3:  # fused experts: each expert's matrix with its own imatrix row, as llama-quantize slices it
        from quant.api import quantize_tensor

        return quant.dequantize(quantize_tensor(x, qtype, imatrix=w), qtype, x.shape)
    return quant.dequantize(quant.quantize(x, qtype, imatrix=w), qtype, x.shape)


def build_profile(model: "str | os.PathLike[str]", calib: "str | os.PathLike[str]", *,
                  imatrix: Imatrix | None = None, imatrix_label: str = "", use_imatrix: bool = True,
                  chunk_size: int = 512, n_chunks: int | None = None,
                  candidate_types: Sequence[str] = CANDIDATE_TYPES, measure: bool = True, measure_seqs: int = 8,
                  measure_len: int = 128, cache: CalibrationCache | None = None,
                  progress: ProgressFn | None = None, measure_mode: str = "stream",
                  imatrix_matmul: str = IMATRIX_MATMUL) -> Profile:
    """Measure every quantizable tensor of `model` at every candidate type on the calibration set `calib`.
    `imatrix` given: use it; else (use_imatrix) collect one (cached). Every (tensor, type) row comes from
    `cache` when present there, so a second run of the same model + calibration set does no forward pass.
    measure_mode "stream" (default): block-level effects + calibrated gains, one sweep over the blocks
    (analyzer.stream_measure); "exact": one whole-model pass per (tensor, type), the reference it is checked
    against (docs/ANALYZER.md). `imatrix_matmul`: the precision of a collected imatrix's matmuls
    (analyzer.collect; default bfloat16, recorded in the report's `imatrix.matmul`)."""

    t0 = time.perf_counter()
    model, calib = Path(model), Path(calib)
    if measure_mode not in MEASURE_MODES:
        raise QuantGateError(f"measure mode {measure_mode!r} is not one of {', '.join(MEASURE_MODES)}")
    if measure and measure_mode == "stream" and not can_stream(model):
        measure_mode = "exact"  # no streamed measurement for this architecture: the whole-model reference
    for t in candidate_types:
        if t not in CANDIDATE_TYPES:
            raise QuantGateError(f"candidate type {t!r} is not one of {', '.join(CANDIDATE_TYPES)}")
    with open_checkpoint(model, allow_requantize=True) as ckpt:
        model_sha = model_identity(ckpt)
        weights_sha = checkpoint_sha256(ckpt.files)
        plan = plan_model(ckpt)
        tensors = [(t.name, tuple(int(d) for d in t.shape), current_type(plan, t),
                    allows_quantization(t.name, tuple(t.shape), plan.arch)) for t in plan.tensors]
        arch = plan.arch
    ds = load_dataset(calib)
    texts = [s.text for s in ds.usable()]
    t_hash = time.perf_counter()

    imat_info: dict[str, Any] = {"used": False}
    if imatrix is not None:
        imat_info = {"used": True, "source": imatrix_label or "file", "digest": imatrix_digest(imatrix)}
    elif use_imatrix:
        imatrix = cached_imatrix(model, calib, model_sha, chunk_size=chunk_size, n_chunks=n_chunks, cache=cache,
                                 tool_version=__version__, matmul_dtype=imatrix_matmul, progress=progress)
        imat_info = {"used": True, "source": "collected", "digest": imatrix_digest(imatrix),
                     "chunk_size": imatrix.chunk_size, "chunk_count": imatrix.chunk_count, "n_chunks": n_chunks,
                     "matmul": imatrix_matmul}
    t_imat = time.perf_counter()
    measure_cfg = {"n_seqs": measure_seqs, "seq_len": measure_len, "mode": measure_mode} if measure else None
    if measure_cfg is not None and measure_mode == "stream":
        measure_cfg["version"] = STREAM_VERSION  # in every row's key: a changed measurement never hits old rows
    mtoks = calibration_chunks(model, texts, measure_len, measure_seqs) if measure else None
    tokens = tokens_sha256(mtoks.chunks) if mtoks is not None else None
    gains: dict[str, float] = {}

    profiles: list[TensorProfile] = []
    todo: list[tuple[TensorProfile, list[str], dict[str, CacheKey]]] = []
    for name, shape, src_type, quantizable in tensors:
        n = int(np.prod(shape, dtype=np.int64))
        tp = TensorProfile(name, list(shape), n, src_type, quantizable)
        profiles.append(tp)
        if not quantizable:
            continue
        keys = {}
        missing = []
        for qt in candidate_types:
            if shape[-1] % _block(qt):
                continue  # llama.cpp would fall back to another type: not a candidate
            keys[qt] = CacheKey(model_sha, ds.sha256, "tensor_type_error",
                                {"tensor": name, "type": qt, "imatrix": imat_info.get("digest"),
                                 "measure": measure_cfg, "tokens": tokens}, __version__)
            hit = cache.get_json(keys[qt]) if cache is not None else None
            if hit is not None:
                if "gain" in hit:
                    gains[name] = hit.pop("gain")
                tp.candidates[qt] = TypeStats(**hit)
            else:
                missing.append(qt)
        if missing:
            todo.append((tp, missing, keys))

    if todo and measure_cfg is not None and measure_mode == "stream":
        gains.update(_compute_streamed(model, arch, mtoks.chunks, todo, imatrix, cache, progress))
    elif todo:
        _compute(model, arch, mtoks.chunks if mtoks is not None else None, todo, imatrix, cache, progress)
    release_free_memory()  # the sweep's heap pages, before the caller (quantize --precision auto) quantizes
    t_measure = time.perf_counter()
    for tp in profiles:
        tp.candidates = {qt: tp.candidates[qt] for qt in candidate_types if qt in tp.candidates}
        _fit_gain(tp, gains.get(tp.name))
    prof = Profile(
        model={"path": str(model), "sha256": model_sha, "weights_sha256": weights_sha, "arch": arch,
               "n_params": int(sum(tp.n_params for tp in profiles))},
        calibration={"path": str(calib), "sha256": ds.sha256, "samples": len(texts)},
        imatrix=imat_info, measure=measure_cfg, candidate_types=list(candidate_types), tensors=profiles,
        tool_version=__version__)
    prof.validation = validation_stats(prof)
    prof.timings = {"hash_plan_s": t_hash - t0, "imatrix_s": t_imat - t_hash, "tensors_s": t_measure - t_imat,
                    "total_s": time.perf_counter() - t0, "computed_tensors": len(todo)}
    return prof


def _block(qtype: str) -> int:

    return get_qtype(qtype).block_size


def _compute(model: Path, arch: str, chunks: list[list[int]] | None, todo, imatrix: Imatrix | None, cache,
             progress: ProgressFn | None) -> None:
    """Fill the missing (tensor, type) rows: quantize/dequantize, estimate and, with `chunks`, measure each pair's
    whole-model effect (one full forward pass per pair: the exact reference mode); store."""

    with ExitStack() as stack:
        if chunks is not None:
            meas = _Measurer(model, chunks)
            params = param_slots(meas.model, arch)
            read = {g: p.read for g, p in params.items()}
        else:
            meas, params, read = None, {}, stack.enter_context(_weight_readers(model, arch))
        for i, (tp, missing, keys) in enumerate(todo):
            if tp.name not in read:
                raise QuantGateError(f"tensor {tp.name} has no transformers parameter to measure")
            x = read[tp.name]()
            w = imatrix.values(tp.name) if imatrix is not None else None
            for qt in missing:
                xq = _quant_dequant(x, qt, w)
                st = TypeStats(tp.size_of(qt), rel_weight_error(x, xq, w))
                if meas is not None:
                    st.measured_kld, st.measured_mse = meas.measure(params[tp.name], xq)
                tp.candidates[qt] = st
                if cache is not None:
                    cache.put_json(keys[qt], asdict(st))
                del xq
            del x
            if progress is not None:
                progress(i + 1, len(todo), tp.name)


@contextmanager
def _weight_readers(model: Path, arch: str) -> Iterator[dict[str, Any]]:
    """GGUF name -> reader of its float32 HF-layout weight, one tensor at a time (layer-streamed checkpoints: no
    model in memory; other architectures: the whole transformers model)."""
    if not can_stream(model):
        tm = load_torch_model(model)
        yield {g: p.read for g, p in param_slots(tm, arch).items()}
        return
    with LayerStream(model) as ls:
        yield {g: (lambda hf=hf: ls.weights.read(hf)) for hf, g in _hf_to_gguf(ls.weights.names, arch,
                                                                                  ls.n_layer).items()}


def _hf_to_gguf(hf_names, arch: str, n_layer: int) -> dict[str, str]:
    """HF weight name -> GGUF tensor name (gguf's TensorNameMap for `arch`), for the names that have one."""
    import gguf

    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(archs[arch], n_layer)
    return {hf: g for hf in sorted(hf_names) if hf.endswith(".weight")
            and (g := name_map.get_name(key=hf, try_suffixes=(".weight", ".bias"))) is not None}


def _compute_streamed(model: Path, arch: str, chunks: list[list[int]], todo, imatrix: Imatrix | None, cache,
                      progress: ProgressFn | None) -> dict[str, float]:
    """Fill the missing rows with the layer-streamed measurement (analyzer.stream_measure); returns every
    tensor's gain (block error -> KLD), which each stored row also carries."""
    shapes = {tp.name: tuple(tp.shape) for tp, _, _ in todo}

    def names_of(hf_names, n_layer: int) -> dict[str, str]:
        return _hf_to_gguf(hf_names, arch, n_layer)

    def allowed(name: str, qt: str) -> bool:
        shape = shapes.get(name)
        return shape is not None and shape[-1] % _block(qt) == 0

    res = streamed_sweep(model, chunks, {tp.name: missing for tp, missing, _ in todo}, imatrix=imatrix,
                         quant_dequant=_quant_dequant, gguf_names=names_of, allowed=allowed, progress=progress)
    for tp, missing, keys in todo:
        for qt in missing:
            r = res.rows[tp.name][qt]
            st = TypeStats(tp.size_of(qt), r.est_error, r.measured_kld, r.measured_mse, block_err=r.block_err)
            tp.candidates[qt] = st
            if cache is not None:
                cache.put_json(keys[qt], {**asdict(st), "gain": res.gains.get(tp.name)})
    return res.gains


def _fit_gain(tp: TensorProfile, stream_gain: float | None = None) -> None:
    """Streamed block errors with a calibrated gain: pred = gain * block_err. Otherwise (exact measurements, the
    head in stream mode): gain = exp(median log(measured KLD / est)) over types where both are positive,
    pred = gain * est. Nothing measured: gain 1."""
    if stream_gain is not None and any(s.block_err is not None for s in tp.candidates.values()):
        tp.gain = float(stream_gain)
        for s in tp.candidates.values():
            s.predicted = tp.gain * (s.block_err or 0.0)
        return
    ratios = [math.log(s.measured_kld / s.est_error) for s in tp.candidates.values()
              if s.measured_kld is not None and s.measured_kld > 0 and s.est_error > 0]
    tp.gain = float(math.exp(float(np.median(ratios)))) if ratios else (1.0 if tp.quantizable else None)
    for s in tp.candidates.values():
        s.predicted = tp.gain * s.est_error if tp.gain is not None else None


def validation_stats(prof: Profile) -> dict[str, Any]:
    """Spearman rank correlations that validate the cheap estimate against the measurements (exact mode: the
    whole-model output MSE and KLD; stream mode: the block-output error)."""
    out: dict[str, Any] = {}
    blk = [(tp.name, qt, s) for tp in prof.tensors for qt, s in tp.candidates.items()
           if s.block_err is not None and qt != "F16"]
    if blk:
        out["block_pairs"] = len(blk)
        out["est_vs_block_err_all"] = _spearman([s.est_error for *_, s in blk], [s.block_err for *_, s in blk])
    rows = [(tp.name, qt, s) for tp in prof.tensors for qt, s in tp.candidates.items()
            if s.measured_mse is not None and qt != "F16"]
    if not rows:
        return out
    by_type = {}
    for qt in prof.candidate_types:
        sub = [s for _, t, s in rows if t == qt]
        by_type[qt] = {"est_vs_mse": _spearman([s.est_error for s in sub], [s.measured_mse for s in sub]),
                       "est_vs_kld": _spearman([s.est_error for s in sub], [s.measured_kld for s in sub])}
    out.update({
        "pairs": len(rows),
        "est_vs_mse_all": _spearman([s.est_error for *_, s in rows], [s.measured_mse for *_, s in rows]),
        "est_vs_kld_all": _spearman([s.est_error for *_, s in rows], [s.measured_kld for *_, s in rows]),
        "pred_vs_kld_all": _spearman([s.predicted for *_, s in rows], [s.measured_kld for *_, s in rows]),
        "across_tensors_by_type": {k: v for k, v in by_type.items() if v["est_vs_mse"] is not None},
    })
    return out


# ------------------------------------------------------------------------------------------- choices


def policy_items(prof: Profile, use: str, exclude: set[str] = frozenset()) -> list[Item]:
    """The quantizable tensors as knapsack/threshold items; `use` = "est" or "predicted"."""
    items = []
    for tp in prof.tensors:
        if not tp.quantizable or tp.name in exclude:
            continue
        opts = tuple(Option(qt, s.size_bytes, float(s.est_error if use == "est" else (s.predicted or 0.0)))
                     for qt, s in tp.candidates.items())
        items.append(Item(tp.name, opts))
    return items


def apply_policy(prof: Profile, policy: "ThresholdPolicy | BudgetPolicy",
                 overrides: Sequence[tuple[str, str]] = ()) -> Profile:
    """Choose every quantizable tensor's type: overrides first (pinned, their bytes come off a budget), then the
    policy on the rest. Records policy, overrides, choices, reasons and the summary (bytes, bpw) in `prof`."""
    q = {tp.name: tuple(tp.shape) for tp in prof.tensors if tp.quantizable}
    pinned = override_choices(q, overrides)
    by_name = {tp.name: tp for tp in prof.tensors}
    if isinstance(policy, BudgetPolicy):
        pinned_bytes = sum(by_name[n].size_of(c.qtype) for n, c in pinned.items())
        sub = BudgetPolicy(policy.budget_bytes - pinned_bytes, policy.target, policy.max_units)
        chosen = choose_budget(policy_items(prof, "predicted", set(pinned)), sub)
    else:
        chosen = choose_threshold(policy_items(prof, "est", set(pinned)), policy)
    chosen.update(pinned)
    for tp in prof.tensors:
        if tp.quantizable:
            c: Choice = chosen[tp.name]
            tp.chosen, tp.reason = c.qtype, c.reason
        else:
            tp.chosen, tp.reason = tp.source_type, "not quantizable in llama.cpp: kept as converted"
    prof.policy = policy.to_dict()
    prof.overrides = [[p, t.upper()] for p, t in overrides]
    total = sum(tp.size_of(tp.chosen) for tp in prof.tensors)
    n = prof.model["n_params"]
    pred = sum(tp.candidates[tp.chosen].predicted or 0.0 for tp in prof.tensors
               if tp.quantizable and tp.chosen in tp.candidates)
    counts: dict[str, int] = {}
    for tp in prof.tensors:
        counts[tp.chosen] = counts.get(tp.chosen, 0) + 1
    prof.summary = {"tensor_bytes": int(total), "bits_per_weight": 8.0 * total / max(n, 1),
                    "predicted_error": pred, "type_counts": dict(sorted(counts.items()))}
    return prof


def fixed_bytes(prof: Profile) -> int:
    """Bytes of the tensors no policy chooses (kept at their source float type)."""
    return sum(tp.size_of(tp.source_type) for tp in prof.tensors if not tp.quantizable)
