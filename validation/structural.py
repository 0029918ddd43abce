"""Structural gates: checks on the candidate GGUF file itself, run before any model is loaded.

A file that cannot be parsed at all (missing, not GGUF, truncated, corrupt tensor table) is *unusable*:
`inspect_candidate` raises and the caller exits 2. Everything else becomes a GateResult (kind "structural"):
  structural:verify        quant.verify.verify_gguf finds no spec / llama.cpp problem (values are checked below)
  structural:finite        no NaN or Inf in any dequantized tensor
  structural:file_type     general.file_type agrees with the tensor types present (and quantgate.* provenance)
  structural:sha256        the file's SHA-256 equals the expected one (manifest / registry record), when given
  structural:derived_from  the candidate comes from the baseline's weights, when a baseline is given: same source
                           file, same weights fingerprint, or every tensor within its type's error (LINEAGE.md)
  structural:tokenizer     tokenizer KVs and chat template equal the baseline's, when a baseline is given
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CheckpointError, GGUFFormatError, QuantGateError
from core.hashing import checkpoint_sha256
from core.records import GateResult
from core.text import one_line
from quant.api import dequantize
from quant.fingerprint import weights_fingerprint
from quant.formats import QTYPES
from quant.gguf_split import open_gguf
from quant.loaders import open_checkpoint
from quant.mixes import PRECISIONS, main_types
from quant.model_plan import plan_model
from quant.verify import LLAMA_FTYPES, UNQUANTIZED_TYPES, verify_gguf
from validation.evaluate import model_sha256
from validation.tensor_error import weights_lineage

_CHUNK_ELEMENTS = 1 << 22          # dequantize at most this many values at a time (16 MiB of float32)
_HEX64 = re.compile(r"\b[0-9a-fA-F]{64}\b")


@dataclass
class CandidateFacts:
    """What the structural gates learned about a GGUF: identity, file type, provenance, tensors."""

    path: str
    sha256: str
    nbytes: int
    file_type: int | None
    precision: str | None                   # quantgate.precision, when quantgate wrote the file
    source_sha256: str | None               # quantgate.source_sha256, when quantgate wrote the file
    tensor_types: dict[str, str] = field(default_factory=dict)
    tensor_shapes: dict[str, list[int]] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    source_fingerprint: str | None = None   # quantgate.source_fingerprint (quant.fingerprint), when recorded

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def inspect_candidate(path: "str | os.PathLike[str]") -> CandidateFacts:
    """Hash and parse the candidate strictly; raise QuantGateError (-> exit 2) when it is missing or unparseable."""

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"candidate not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"candidate is not a file: {p}")
    try:
        g = open_gguf(p)  # a split GGUF (any part): the whole set, identified by checkpoint_sha256 over its parts
    except GGUFFormatError as e:
        msg = str(e)
        raise GGUFFormatError(msg if str(p) in msg else f"{p}: {msg}") from None
    files = getattr(g, "files", [p])
    with g:
        ft = g.value("general.file_type")
        return CandidateFacts(
            path=str(files[0]), sha256=checkpoint_sha256(files), nbytes=sum(f.stat().st_size for f in files),
            file_type=int(ft) if isinstance(ft, (int, np.integer)) else None,
            precision=_str_or_none(g.value("quantgate.precision")),
            source_sha256=_str_or_none(g.value("quantgate.source_sha256")),
            tensor_types={t.name: t.qtype for t in g.tensors},
            tensor_shapes={t.name: list(t.shape) for t in g.tensors},
            tensor_bytes={t.name: t.nbytes for t in g.tensors},
            source_fingerprint=_str_or_none(g.value("quantgate.source_fingerprint")),
        )


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def verify_gate(path: "str | os.PathLike[str]") -> GateResult:
    """structural:verify: the file passes verify_gguf (structure, metadata, padding; values are the finite gate's)."""

    rep = verify_gguf(path, check_values=False)
    detail = "no problems" if rep.ok else "; ".join(rep.problems[:5]) + (
        f" (+{len(rep.problems) - 5} more)" if len(rep.problems) > 5 else "")
    return GateResult(name="structural:verify", kind="structural", value=float(len(rep.problems)),
                      comparator="==", threshold=0.0, passed=rep.ok, detail=detail)


def count_non_finite(path: "str | os.PathLike[str]") -> dict[str, tuple[int, int]]:
    """{tensor: (n_nan, n_inf)} for every tensor holding NaN or Inf once dequantized, reading rows in chunks."""

    bad: dict[str, tuple[int, int]] = {}
    with open_gguf(path) as g:
        for t in g.tensors:
            if not t.nbytes or t.qtype not in QTYPES:
                continue
            cols = t.shape[-1] if t.shape else 1
            row_bytes = QTYPES[t.qtype].row_bytes(cols)
            rows = t.nbytes // row_bytes
            raw = g.tensor_data(t)
            step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
            n_nan = n_inf = 0
            for r in range(0, rows, step):
                n = min(step, rows - r)
                x = dequantize(raw[r * row_bytes:(r + n) * row_bytes], t.qtype, (n, cols))
                n_nan += int(np.isnan(x).sum())
                n_inf += int(np.isinf(x).sum())
            if n_nan or n_inf:
                bad[t.name] = (n_nan, n_inf)
    return bad


def finite_gate(path: "str | os.PathLike[str]") -> GateResult:
    """structural:finite: no NaN/Inf anywhere in the dequantized weights."""
    bad = count_non_finite(path)
    n = sum(a + b for a, b in bad.values())
    detail = "all dequantized values are finite" if not bad else "; ".join(
        f"{name}: {a} NaN, {b} Inf" for name, (a, b) in list(bad.items())[:5])
    return GateResult(name="structural:finite", kind="structural", value=float(n), comparator="==",
                      threshold=0.0, passed=not bad, detail=detail)


def _expected_types(file_type: int) -> set[str] | None:

    for mix in PRECISIONS.values():
        if mix.llama_ftype == file_type:
            return main_types(mix)
    return None


def file_type_gate(facts: CandidateFacts, metadata: dict[str, Any]) -> GateResult:
    """structural:file_type: general.file_type's main type (or its ggml fallback) is present, no float file holds
    quantized tensors, and quantgate.precision / quantgate.tensor_type_counts (when present) match the file."""

    problems: list[str] = []
    counts = Counter(facts.tensor_types.values())
    ft = facts.file_type
    quantized = {q for q in counts if q not in UNQUANTIZED_TYPES}
    if ft is None:
        if quantized:
            problems.append("general.file_type is missing but the file holds quantized tensors")
    else:
        name = LLAMA_FTYPES.get(ft, f"unknown({ft})")
        want = _expected_types(ft)
        auto = facts.precision is not None and facts.precision.upper() == "AUTO"
        if want is None:
            problems.append(f"general.file_type {ft} ({name}) is not a file type quantgate can check")
        elif want <= {"F32", "F16", "BF16"}:
            if quantized:
                problems.append(f"general.file_type is {name} but tensors are {', '.join(sorted(quantized))}")
        elif not auto and not (want & set(counts)):
            problems.append(f"general.file_type is {name} but no tensor is {' or '.join(sorted(want))} "
                            f"(types present: {', '.join(sorted(counts))})")
        if auto:  # --precision auto: general.file_type names the closest llama.cpp mix (quantgate.policy)
            try:
                fmix = json.loads(metadata.get("quantgate.policy") or "{}").get("file_type_mix")
            except (ValueError, AttributeError):
                fmix = None
            mix = PRECISIONS.get(str(fmix).upper()) if fmix else None
            if mix is None or mix.llama_ftype != ft:
                problems.append(f"quantgate.policy file_type_mix {fmix} does not match general.file_type {ft} "
                                f"({name})")
        elif facts.precision is not None:
            mix = PRECISIONS.get(facts.precision.upper())
            if mix is None or mix.llama_ftype != ft:
                problems.append(f"quantgate.precision {facts.precision} does not match general.file_type {ft} ({name})")
    recorded = metadata.get("quantgate.tensor_type_counts")
    if isinstance(recorded, str):
        try:
            rec = {str(k): int(v) for k, v in json.loads(recorded).items()}
        except (ValueError, AttributeError, TypeError):
            problems.append("quantgate.tensor_type_counts is not a JSON object of counts")
        else:
            if rec != dict(counts):
                problems.append(f"quantgate.tensor_type_counts {rec} differs from the tensors' types {dict(counts)}")
    detail = "; ".join(problems) if problems else (
        f"general.file_type {ft} ({LLAMA_FTYPES.get(ft, '?') if ft is not None else 'absent'}); types "
        + ", ".join(f"{q}x{n}" for q, n in sorted(counts.items())))
    return GateResult(name="structural:file_type", kind="structural", passed=not problems, detail=detail,
                      value=float(len(problems)), comparator="==", threshold=0.0)


def expected_sha256(manifest: "str | os.PathLike[str]", artifact_name: str) -> str:
    """The SHA-256 a manifest expects: a JSON record (QuantizedArtifact, registry record, verdict: `sha256` or
    `artifact_sha256` key) or a `sha256sum` text file (the line naming `artifact_name`, else its only hash)."""
    p = Path(manifest)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantGateError(f"cannot read manifest {p}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for scope in [data] + [data[k] for k in ("artifact", "verdict") if isinstance(data.get(k), dict)]:
            for key in ("sha256", "artifact_sha256"):
                v = scope.get(key)
                if isinstance(v, str) and _HEX64.fullmatch(v):
                    return v.lower()
        raise QuantGateError(f"manifest {p} has no 'sha256' or 'artifact_sha256' field")
    hits = [(m.group(0).lower(), line) for line in text.splitlines() if (m := _HEX64.search(line))]
    named = [h for h, line in hits if line.rstrip().endswith(artifact_name)]
    if named:
        return named[0]
    if len(hits) == 1:
        return hits[0][0]
    raise QuantGateError(f"manifest {p} has no SHA-256 line for {artifact_name}")


def sha256_gate(facts: CandidateFacts, expected: str, source: str) -> GateResult:
    """structural:sha256: the artifact is byte-for-byte the one a manifest / registry record names."""
    ok = facts.sha256 == expected.lower()
    return GateResult(name="structural:sha256", kind="structural", passed=ok,
                      detail=f"sha256 {facts.sha256[:16]} {'matches' if ok else 'differs from'} {expected[:16]} "
                             f"expected by {source}")


def derived_from_gate(facts: CandidateFacts, baseline: "str | os.PathLike[str]", baseline_sha256: str) -> GateResult:
    """structural:derived_from: the candidate comes from the baseline's weights (docs/LINEAGE.md). In order:
    quantgate.source_sha256 equals the baseline's checkpoint SHA-256 (same file); quantgate.source_fingerprint
    equals the baseline's weights fingerprint (same weights in another container: HF folder, F32/F16/BF16 GGUF of
    quantgate's or llama.cpp's converter); otherwise (no quantgate metadata: llama-quantize output, a downloaded
    GGUF; or another container's rounding) every dequantized tensor must be within its type's relative-RMSE bound
    of the baseline's tensor, and the first tensor that is not is named."""
    res = GateResult(name="structural:derived_from", kind="structural")
    if facts.source_sha256 is not None and facts.source_sha256 == baseline_sha256:
        res.passed = True
        res.detail = f"quantgate.source_sha256 {facts.source_sha256[:16]} matches the baseline's {baseline_sha256[:16]}"
        return res
    if facts.source_fingerprint is not None:
        base_fp = weights_fingerprint(baseline)
        if facts.source_fingerprint == base_fp:
            res.passed = True
            res.detail = (f"quantgate.source_fingerprint {facts.source_fingerprint[:16]} matches the baseline's "
                          "weights fingerprint (same weights, another container)")
            return res
        why = (f"quantgate.source_fingerprint {facts.source_fingerprint[:16]} differs from the baseline's "
               f"{(base_fp or 'none')[:16]}")
    elif facts.source_sha256 is not None:
        why = (f"quantgate.source_sha256 {facts.source_sha256[:16]} differs from the baseline's "
               f"{baseline_sha256[:16]} and the file records no weights fingerprint")
    else:
        why = "no quantgate provenance in the file"
    chk = weights_lineage(baseline, facts.path)
    res.passed = chk.problem is None
    if res.passed:
        w = chk.worst
        res.detail = (f"{why}; checked by weights: all {chk.n_checked} tensors are within their type's error bound "
                      f"of the baseline" + (f" (closest: {w.name} {w.qtype}, relative RMSE {w.rel_rmse:.3g})"
                                            if w is not None and w.rel_rmse is not None else ""))
    else:
        res.detail = f"{why}; checked by weights: {chk.problem}"
    return res


#: the tokenizer KVs that decide what text a model sees and emits (tokenizer.ggml.pre is left out: it may be
#: overridden at conversion with --tokenizer-pre and only picks the pre-tokenizer regex for BPE vocabularies)
TOKENIZER_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def baseline_tokenizer_kv(baseline: "str | os.PathLike[str]") -> dict[str, Any]:
    """The baseline's tokenizer KVs ({key: value}, only TOKENIZER_FIELDS): a GGUF's own, or for an HF checkpoint
    the ones quantgate's converter writes for it (quant.tokenizer_gguf.tokenizer_kvs via plan_model)."""
    with open_checkpoint(Path(baseline), allow_requantize=True) as ckpt:
        if ckpt.kind == "gguf":
            kvs = ckpt.gguf_kv
        else:
            tok = plan_model(ckpt).tokenizer
            kvs = tok.kv if tok is not None else []
    return {kv.key: kv.value for kv in kvs if kv.key in TOKENIZER_FIELDS}


def _plain(v: Any) -> Any:
    """Arrays as lists, and GGUFWriter's bytes strings (how the converter holds SentencePiece pieces) as str."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", errors="surrogateescape")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _first_difference(key: str, cand: Any, base: Any) -> str | None:
    """None when equal; else what differs, without quoting more than a short excerpt of either value."""
    if cand is None or base is None:
        if cand is None and base is None:
            return None
        return f"{key} is {'missing from the candidate' if cand is None else 'absent from the baseline'}"
    cand, base = _plain(cand), _plain(base)
    if key == "tokenizer.ggml.scores" and isinstance(cand, list) and isinstance(base, list):
        try:  # bit-for-bit as float32 (the type GGUF stores them in)
            a, b = np.asarray(cand, np.float32).view(np.uint32), np.asarray(base, np.float32).view(np.uint32)
        except (TypeError, ValueError):
            return f"{key} is not an array of numbers"
        if a.shape != b.shape:
            return f"{key} has {a.size} entries, the baseline {b.size}"
        diff = np.flatnonzero(a != b)
        return None if not diff.size else f"{key} differs from the baseline's at index {int(diff[0])}"
    if isinstance(cand, list) and isinstance(base, list):
        if len(cand) != len(base):
            return f"{key} has {len(cand)} entries, the baseline {len(base)}"
        i = next((i for i, (x, y) in enumerate(zip(cand, base)) if x != y), None)
        if i is None:
            return None
        return f"{key} differs from the baseline's at index {i}: {one_line(repr(cand[i]))[:40]} vs " \
               f"{one_line(repr(base[i]))[:40]}"
    if type(cand) is not type(base) and not (isinstance(cand, (int, float)) and isinstance(base, (int, float))
                                             and not isinstance(cand, bool) and not isinstance(base, bool)):
        return f"{key} has type {type(cand).__name__}, the baseline {type(base).__name__}"
    if cand != base:
        return f"{key} differs from the baseline's ({one_line(repr(cand))[:40]} vs {one_line(repr(base))[:40]})"
    return None


def tokenizer_gate(candidate_meta: dict[str, Any], baseline: "str | os.PathLike[str]") -> GateResult:
    """structural:tokenizer: the candidate's tokenizer (model, tokens, types, merges, scores, special ids, add_bos,
    chat template) equals the baseline's. Scoring tokenizes with the baseline, so a tampered vocabulary or chat
    template would otherwise pass every metric gate; fails on the first differing field."""
    res = GateResult(name="structural:tokenizer", kind="structural", comparator="==", threshold=0.0)
    try:
        base = baseline_tokenizer_kv(baseline)
    except QuantGateError as e:
        base, why = None, one_line(str(e))
    problems: list[str] = []
    if base is None:
        problems.append(f"cannot read the baseline's tokenizer to compare: {why}")
    else:
        for key in TOKENIZER_FIELDS:
            d = _first_difference(key, candidate_meta.get(key), base.get(key))
            if d is not None:
                problems.append(d)
    res.passed = not problems
    res.value = float(len(problems))
    if problems:
        res.detail = problems[0] + (f" (+{len(problems) - 1} more differing fields)" if len(problems) > 1 else "")
    else:
        n = len(base.get("tokenizer.ggml.tokens") or []) if base else 0
        res.detail = (f"tokenizer identical to the baseline's ({n} tokens, {len(base)} fields compared)" if base
                      else "neither the candidate nor the baseline carries a tokenizer")
    return res


def read_metadata(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """The GGUF's KVs as {key: value} (arrays as lists)."""

    with open_gguf(path) as g:
        return {kv.key: (kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value) for kv in g.kv}


def structural_gates(candidate: "str | os.PathLike[str]", *, baseline: "str | os.PathLike[str] | None" = None,
                     baseline_sha256: str | None = None, manifest: "str | os.PathLike[str] | None" = None,
                     expected_sha: str | None = None) -> tuple[CandidateFacts, list[GateResult]]:
    """Run every structural gate on `candidate`; raises QuantGateError (exit 2) only when it is unusable."""
    facts = inspect_candidate(candidate)
    meta = read_metadata(candidate)
    gates = [verify_gate(candidate), finite_gate(candidate), file_type_gate(facts, meta)]
    if manifest is not None:
        gates.append(sha256_gate(facts, expected_sha256(manifest, Path(candidate).name), str(manifest)))
    elif expected_sha is not None:
        gates.append(sha256_gate(facts, expected_sha, "--expect-sha256"))
    if baseline is not None:
        if baseline_sha256 is None:

            baseline_sha256 = model_sha256(baseline)
        gates.append(derived_from_gate(facts, baseline, baseline_sha256))
    if baseline is not None:
        gates.append(tokenizer_gate(meta, baseline))
    return facts, gates


__all__ = ["CandidateFacts", "inspect_candidate", "verify_gate", "count_non_finite", "finite_gate",
           "file_type_gate", "expected_sha256", "sha256_gate", "derived_from_gate", "read_metadata",
           "structural_gates", "tokenizer_gate", "baseline_tokenizer_kv", "TOKENIZER_FIELDS"]
