"""The in-process pipeline: plain functions chaining load -> plan -> choose types -> quantize -> write.

CLI commands, DVC stages and Celery tasks all call these; they add transport, never logic.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGUFValueType

import quant
from analyzer.cache import CalibrationCache
from core.errors import QuantGateError, UnsupportedTypeError
from core.hashing import canonical_json, checkpoint_sha256, file_sha256, remember_file_sha256, sha256_text
from core.paths import check_output_target
from core.progress import ProgressFn
from core.records import (
    AUTO,
    QuantizedArtifact,
    QuantizeRequest,
    Recipe,
    is_auto,
    job_key,
)
from core.version import __version__
from quant.api import quantize_tensor
from quant.fingerprint import PLACEHOLDER, fingerprint_or_tap
from quant.formats import get_qtype
from quant.gguf_kv import KV
from quant.gguf_split import plan_parts, split_path, split_prefix, write_split_gguf
from quant.gguf_writer import TensorSpec, write_gguf
from quant.imatrix import load_imatrix
from quant.loaders import open_checkpoint
from quant.mixes import (
    allows_quantization,
    current_type,
    get_mix,
    llama_quantize_order,
    missing_kernels,
    tensor_types,
)
from quant.model_plan import plan_model
from quant.verify import GGML_QNT_VERSION
from quantgate.config import registry_settings
from validation.gate import UnusableInput, gate_and_report

#: Keys the pipeline owns in every file it writes; a source's copies of them are replaced.
_OWNED_KEYS = ("general.file_type", "general.quantization_version")




def identity_kv(recipe: Recipe, source_sha: str, source_kind: str, key: str,
                source_fingerprint: str | None = None, source_lineage: str | None = None) -> list[KV]:
    """The quantgate.* keys every file we write carries: tool version, source identity (file SHA-256 and, when
    given, the weights fingerprint of quant.fingerprint: docs/LINEAGE.md; where the source came from: HF cache id,
    models:/ version or DVC revision, quantgate.inputs), recipe and job key."""
    s = GGUFValueType.STRING
    fp = [KV("quantgate.source_fingerprint", source_fingerprint, s)] if source_fingerprint else []
    if source_lineage:
        fp += [KV("quantgate.source_ref", str(json.loads(source_lineage).get("ref", "")), s),
               KV("quantgate.source_lineage", source_lineage, s)]
    return [
        KV("quantgate.version", __version__, s),
        KV("quantgate.source_sha256", source_sha, s),
        *fp,
        KV("quantgate.source_format", source_kind, s),
        KV("quantgate.precision", recipe.precision, s),
        KV("quantgate.recipe", canonical_json(recipe.as_dict()), s),
        KV("quantgate.recipe_sha256", recipe.key(), s),
        KV("quantgate.job_key", key, s),
    ]


def _provenance_kv(
    recipe: Recipe, source_sha: str, source_kind: str, key: str, types: dict[str, str],
    source_fingerprint: str | None = None, source_lineage: str | None = None,
) -> list[KV]:
    s = GGUFValueType.STRING
    kv = identity_kv(recipe, source_sha, source_kind, key, source_fingerprint, source_lineage)
    kv.append(KV("quantgate.tensor_type_counts", canonical_json(dict(sorted(Counter(types.values()).items()))), s))
    if recipe.imatrix_sha256:
        kv.append(KV("quantgate.imatrix_sha256", recipe.imatrix_sha256, s))
    if recipe.policy is not None:
        kv.append(KV("quantgate.policy", recipe.policy, s))
        kv.append(KV("quantgate.tensor_types", canonical_json(types), s))
    return kv


def _explicit_types(plan, type_map: dict[str, str]) -> dict[str, str]:
    """Types for precision AUTO: the map's type for every tensor llama.cpp may quantize (each must be listed,
    with a type whose block divides the row), the converted float type for the others."""

    names = {t.name for t in plan.tensors}
    extra = sorted(set(type_map) - names)
    if extra:
        raise UnsupportedTypeError(f"type map names tensors the model does not have: {', '.join(extra[:5])}")
    out = {}
    for t in plan.tensors:
        if not allows_quantization(t.name, tuple(t.shape), plan.arch):
            cur = current_type(plan, t)
            if type_map.get(t.name, cur) != cur:
                raise UnsupportedTypeError(f"{t.name} cannot be quantized in llama.cpp; it stays {cur}")
            out[t.name] = cur
            continue
        if t.name not in type_map:
            raise UnsupportedTypeError(f"type map has no type for quantizable tensor {t.name}")
        qt = get_qtype(type_map[t.name])
        if int(t.shape[-1]) % qt.block_size:
            raise UnsupportedTypeError(f"{t.name}: rows of {t.shape[-1]} are not a multiple of {qt.name}'s block "
                                       f"of {qt.block_size}")
        out[t.name] = qt.name
    return out


def audit(action: str, **fields) -> None:
    """Append an event to the hash-chained audit trail (registry.audit; database from QUANTGATE_AUDIT_DB_URL or
    beside the MLflow store). Every pipeline action goes through here, whichever runner called it."""
    from registry.audit import (
        record_event,  # lazy: SQLAlchemy/MLflow load at first use (light worker start)
    )

    record_event(action, db_url=registry_settings().audit_db_url, **fields)


def import_cache(src: Path, cache_dir: "Path | None" = None):
    """Import a calibration-cache export (analyzer.cache, every entry verified) and record a "cache_import" audit
    event: imported measurements steer quantization, so where they came from must be traceable."""
    from registry.audit import (
        file_ref,  # lazy: SQLAlchemy/MLflow load at first use (light worker start)
    )

    with CalibrationCache(cache_dir) as cache:
        result = cache.import_file(src)
        db_path = cache.path
    audit("cache_import", inputs=[file_ref(result.source, "cache_export")],
          config={"cache_db": str(db_path), "entries": result.entries, "added": result.added,
                  "skipped": result.skipped},
          detail=f"imported {result.added} of {result.entries} calibration cache entries")
    return result


def _recipe_of(req: QuantizeRequest):
    """The request's llama.cpp mix, its Recipe and the loaded importance matrix (None without one)."""
    auto = is_auto(req.precision)
    if auto and (not req.type_map or req.file_type_mix is None):
        raise QuantGateError("precision AUTO needs a type map and the closest llama.cpp mix (analyzer)")
    mix = get_mix(req.file_type_mix if auto else req.precision)
    imat = load_imatrix(req.imatrix) if req.imatrix is not None else None
    type_map = dict(req.type_map) if auto else {}
    recipe = Recipe(
        precision=AUTO if auto else mix.name,
        pure=req.pure,
        imatrix_sha256=file_sha256(req.imatrix) if req.imatrix is not None else None,
        output_tensor_type=req.output_tensor_type.upper() if req.output_tensor_type else None,
        token_embedding_type=req.token_embedding_type.upper() if req.token_embedding_type else None,
        tensor_type_overrides=tuple((p, t.upper()) for p, t in req.tensor_type_overrides),
        allow_requantize=req.allow_requantize,
        generic=req.generic,
        type_map_sha256=sha256_text(canonical_json(type_map)) if auto else None,
        policy=req.policy if auto else None,
    )
    return mix, recipe, imat


def _types_of(req: QuantizeRequest, plan, mix, recipe: Recipe, imat) -> dict[str, str]:
    """Every tensor's ggml type: the AUTO type map checked against the model, or the mix's llama.cpp rules; a type
    this build has no quantization kernel for is refused before anything is written."""
    if is_auto(req.precision):
        return _explicit_types(plan, dict(req.type_map))
    types = tensor_types(
        plan,
        mix.name,
        pure=req.pure,
        output_tensor_type=recipe.output_tensor_type,
        token_embedding_type=recipe.token_embedding_type,
        tensor_type_overrides=recipe.tensor_type_overrides,
        allow_requantize=req.allow_requantize,
        imatrix_names=set(imat.entries) if imat is not None else None,
    )
    missing = missing_kernels(types)
    if missing:
        raise UnsupportedTypeError(f"{recipe.precision} needs tensor type(s) {', '.join(missing)}, which this "
                                   f"quantgate has no quantization kernel for")
    return types


@dataclass
class QuantizePlan:
    """What a quantization would write, without writing it (`quantize --dry-run`): each tensor's type and bytes in
    file order, the totals and the bits per weight, by the same planning code a real run uses."""

    source: str
    precision: str
    file_type: int
    file_type_name: str
    tensors: list[dict]          # {name, shape, type, bytes}, in the order the file holds them
    n_params: int
    tensor_bytes: int
    bits_per_weight: float

    def to_dict(self) -> dict:
        return asdict(self)


def plan_quantize(req: QuantizeRequest) -> QuantizePlan:
    """The plan of `quantize_model(req)` (types, sizes, bits per weight) without hashing or writing anything."""
    from registry.facts import file_type_name  # lazy: the registry's facts module only for a dry run

    mix, recipe, imat = _recipe_of(req)
    with open_checkpoint(req.source, allow_requantize=req.allow_requantize) as ckpt:
        plan = plan_model(ckpt, generic=req.generic)
        types = _types_of(req, plan, mix, recipe, imat)
        by_name = {pt.name: pt for pt in plan.tensors}
        rows = [{"name": n, "shape": list(by_name[n].shape), "type": types[n],
                 "bytes": get_qtype(types[n]).nbytes(tuple(by_name[n].shape))}
                for n in llama_quantize_order(list(by_name))]
    n_params = sum(int(np.prod(pt.shape, dtype=np.int64)) for pt in plan.tensors)
    total = sum(r["bytes"] for r in rows)
    return QuantizePlan(str(req.source), recipe.precision, mix.llama_ftype, file_type_name(mix.llama_ftype), rows,
                        n_params, total,
                        8.0 * total / max(n_params, 1))


def quantize_model(
    req: QuantizeRequest, *, on_tensor: ProgressFn | None = None, record: bool = True
) -> QuantizedArtifact:
    """Quantize a checkpoint to a GGUF v3 file tensor by tensor (bounded memory), atomically; returns its record
    and (record=True) appends a "quantize" audit event."""

    t0 = time.perf_counter()
    mix, recipe, imat = _recipe_of(req)
    imatrix_sha = recipe.imatrix_sha256
    check_output_target(req.out, [req.source] + ([req.imatrix] if req.imatrix is not None else []))
    with open_checkpoint(req.source, allow_requantize=req.allow_requantize) as ckpt:
        check_output_target(req.out, ckpt.files)
        source_sha = checkpoint_sha256(ckpt.files)
        t_hash = time.perf_counter()
        plan = plan_model(ckpt, generic=req.generic)
        types = _types_of(req, plan, mix, recipe, imat)
        key = job_key(source_sha, recipe, __version__)
        kv = [k for k in plan.kv if k.key not in _OWNED_KEYS and not k.key.startswith("quantgate.")]
        kv += [
            KV("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32),
            KV("general.file_type", mix.llama_ftype, GGUFValueType.UINT32),
        ]
        split_req = req.split_max_bytes is not None or req.split_max_tensors is not None
        # Not cached: computed from the tensors as this loop reads them (one read of the source, not two), its
        # header value filled in after the last tensor (write_gguf final_kv); a split output or a checkpoint
        # that cannot be tapped is fingerprinted first, in a pass of its own.
        fingerprint, tap = fingerprint_or_tap(ckpt, req.source, tap=not split_req)
        t_fp = time.perf_counter()
        meta_kv = list(kv)
        kv = meta_kv + _provenance_kv(recipe, source_sha, ckpt.kind, key, types,
                                      PLACEHOLDER if tap is not None else fingerprint, req.source_lineage)
        spent = {"read": 0.0, "quantize": 0.0, "fingerprint_in_pass": 0.0}

        def producer(pt, qtype: str) -> Callable[[], np.ndarray]:
            qt = get_qtype(qtype)

            def produce() -> np.ndarray:
                t_a = time.perf_counter()
                x = pt.source.read_scratch()  # valid until the next tensor's read: quantized (copied) below
                t_r = t_t = time.perf_counter()
                if tap is not None:
                    tap.add(pt.source, x)
                    t_t = time.perf_counter()
                    spent["fingerprint_in_pass"] += t_t - t_r
                if pt.transform is not None:
                    x = pt.transform(x)
                w = imat.values(pt.name) if (imat is not None and not qt.is_float) else None
                t_b = time.perf_counter()
                out = quantize_tensor(x, qt.name, imatrix=w, name=pt.name)  # 3-D experts: per-expert imatrix
                spent["read"] += (t_r - t_a) + (t_b - t_t)
                spent["quantize"] += time.perf_counter() - t_b
                return out

            return produce

        # llama-quantize writes tensors in its loader's order (non-block first, then by layer): so do we.
        by_name = {pt.name: pt for pt in plan.tensors}
        ordered = [by_name[n] for n in llama_quantize_order(list(by_name))]
        specs = [TensorSpec(pt.name, tuple(pt.shape), types[pt.name], producer(pt, types[pt.name])) for pt in ordered]
        n_params = sum(int(np.prod(pt.shape, dtype=np.int64)) for pt in plan.tensors)
        tensor_bytes = {s.name: get_qtype(s.qtype).nbytes(s.shape) for s in specs}
        total = sum(tensor_bytes.values())
        made: list[QuantizedArtifact] = []
        split = None
        if split_req:
            split = plan_parts([tensor_bytes[s.name] for s in specs], max_bytes=req.split_max_bytes,
                               max_tensors=req.split_max_tensors)
            for i in range(len(split)):
                check_output_target(split_path(split_prefix(req.out), i, len(split)), ckpt.files)

        def final_kv() -> list[KV]:
            """The header's KVs with the fingerprint the loop computed (same length as the placeholder's)."""
            nonlocal fingerprint
            t_f = time.perf_counter()
            fingerprint = tap.finish()
            spent["fingerprint_in_pass"] += time.perf_counter() - t_f
            return meta_kv + _provenance_kv(recipe, source_sha, ckpt.kind, key, types, fingerprint,
                                            req.source_lineage)

        def publish(result) -> None:
            """Runs with the bytes durable in the temp file, before the rename: the audit event exists before the
            GGUF is visible at req.out; an audit failure removes the temp file and publishes nothing."""
            t_write = time.perf_counter()
            art = QuantizedArtifact(
                path=str(result.path),
                sha256=result.sha256,
                nbytes=result.nbytes,
                source=str(req.source),
                source_sha256=source_sha,
                recipe=recipe,
                job_key=key,
                tool_version=__version__,
                file_type=mix.llama_ftype,
                tensor_types=dict(types),
                tensor_bytes=tensor_bytes,
                parts=result.part_records() if split else [],
                n_params=n_params,
                bits_per_weight=8.0 * total / max(n_params, 1),
                seconds=t_write - t0,
                timings={"hash": t_hash - t0, "fingerprint": t_fp - t_hash, "quantize_write": t_write - t_fp,
                         **spent, "output_hash": result.seconds.get("hash", 0.0),
                         "write": result.seconds.get("write", 0.0)},
            )
            if record:
                inputs = [{"role": "source", "path": str(req.source), "sha256": source_sha,
                           **({"lineage": json.loads(req.source_lineage)} if req.source_lineage else {})}]
                if req.imatrix is not None:
                    inputs.append({"role": "imatrix", "path": str(req.imatrix), "sha256": imatrix_sha})
                outputs = [{"role": "gguf", "path": art.path, "sha256": art.sha256}] + [
                    {"role": f"gguf_part_{i + 1}", **p} for i, p in enumerate(art.parts)]
                audit("quantize", artifact_sha256=art.sha256, job_key=art.job_key, inputs=inputs, outputs=outputs,
                      config={"recipe": recipe.as_dict(), "bits_per_weight": art.bits_per_weight,
                              "nbytes": art.nbytes})
            made.append(art)

        with quant.threads(req.threads):
            if split:
                write_split_gguf(split_prefix(req.out), kv=kv, tensors=specs, parts=split, on_tensor=on_tensor,
                                 before_publish=publish)
            else:
                write_gguf(req.out, kv=kv, tensors=specs, on_tensor=on_tensor, before_publish=publish,
                           final_kv=final_kv if tap is not None else None)
    art = made[0]
    # hashed while writing: validate/registration need not re-read them (a split's sha256 is the set's, not a file's)
    for p in art.parts or [{"path": art.path, "sha256": art.sha256}]:
        remember_file_sha256(p["path"], p["sha256"])
    return art


def validate_artifact(baseline: Path, candidate: Path, gates, *, record: bool = True, **kwargs):
    """Run the gate (validation.gate.gate_and_report: structural gates, expectation suites, metric gates, reports) and
    append a "validate" audit event with the verdict; unusable inputs are recorded too, then re-raised."""

    try:
        verdict = gate_and_report(baseline, candidate, gates, **kwargs)
    except UnusableInput as e:
        if record:
            audit("validate", inputs=[{"role": "baseline", "path": str(baseline)},
                                      {"role": "candidate", "path": str(candidate)}],
                  config={"gate_set": gates.name}, verdict="unusable", detail=str(e))
        raise
    if record:
        from registry.trust import (
            record_validation,  # lazy: SQLAlchemy/MLflow load at first use (light worker start)
        )

        outputs = [{"role": "verdict", "path": verdict.report_paths["verdict"]}] if "verdict" in verdict.report_paths \
            else []
        record_validation(verdict, db_url=registry_settings().audit_db_url, outputs=outputs,
                          inputs=[{"role": "baseline", "path": str(baseline)},
                                  {"role": "candidate", "path": str(candidate), "sha256": verdict.artifact_sha256}])
    return verdict


def artifact_json(a: QuantizedArtifact) -> str:
    """Pretty JSON of an artifact record (what `quantize --json` prints)."""
    return json.dumps(a.to_dict(), indent=2, sort_keys=True)


