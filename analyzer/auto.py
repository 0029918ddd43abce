"""`--precision auto`: turn a sensitivity profile and a policy into a pipeline request (explicit per-tensor
types, the closest llama.cpp file type, and the policy record the file carries)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from analyzer.cache import CalibrationCache
from analyzer.policy import (
    BudgetPolicy,
    PolicyError,
    ThresholdPolicy,
    budget_for_bpw,
    budget_for_size,
    parse_size,
)
from analyzer.profile import (
    Profile,
    apply_policy,
    build_profile,
    cached_imatrix,
    fixed_bytes,
    imatrix_digest,
    model_identity,
)
from core.errors import QuantGateError
from core.hashing import canonical_json
from core.progress import ProgressFn
from core.records import AUTO, QuantizeRequest
from core.version import __version__
from quant.formats import get_qtype
from quant.gguf_writer import encode_kv
from quant.imatrix import load_imatrix, save_imatrix_gguf
from quant.loaders import open_checkpoint
from quant.mixes import tensor_types
from quant.model_plan import plan_model
from runtime.datasets import DEFAULT_CALIBRATION

#: Room for the quantgate.* KVs an auto file adds (recipe, policy, per-tensor types), per tensor and in all.
_META_PER_TENSOR = 96
_META_FIXED = 8192
_ALIGN = 32
#: llama.cpp mixes general.file_type may name for an auto file (the float ones describe unquantized files).
_FILE_TYPE_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass
class AutoPlan:
    """What the pipeline needs for an auto file, and the profile with the choices made."""

    profile: Profile
    type_map: dict[str, str]
    file_type_mix: str
    policy_json: str


def mix_sizes(model: "str | os.PathLike[str]") -> dict[str, int]:
    """Tensor-data bytes of every llama.cpp mix for this model (types from quant.mixes, no quantization)."""

    with open_checkpoint(Path(model), allow_requantize=True) as ckpt:
        plan = plan_model(ckpt)
        shapes = {t.name: tuple(t.shape) for t in plan.tensors}
        return {m: sum(get_qtype(q).nbytes(shapes[n]) for n, q in tensor_types(plan, m).items())
                for m in _FILE_TYPE_MIXES}


def closest_mix(sizes: dict[str, int], tensor_bytes: int) -> str:
    """The llama.cpp mix whose size is closest to `tensor_bytes` (the smaller one on a tie)."""
    return min(sizes, key=lambda m: (abs(sizes[m] - tensor_bytes), sizes[m]))


def header_overhead(model: "str | os.PathLike[str]", n_tensors: int) -> int:
    """Bytes of the GGUF header (model KVs + tensor infos + quantgate KVs, estimated from above) and padding."""

    with open_checkpoint(Path(model), allow_requantize=True) as ckpt:
        plan = plan_model(ckpt)
        kv_bytes = sum(len(encode_kv(k)) for k in plan.kv)
        infos = sum(len(t.name.encode("utf-8")) + 8 + 4 + 8 * 4 + 4 + 8 for t in plan.tensors)
    return 24 + kv_bytes + infos + _META_FIXED + _META_PER_TENSOR * n_tensors + _ALIGN * (n_tensors + 1)


def make_policy(prof: Profile, model: "str | os.PathLike[str]", *, mode: str, target_bpw: float | None = None,
                target_size: str | None = None, threshold: ThresholdPolicy | None = None
                ) -> ThresholdPolicy | BudgetPolicy:
    """The policy object for a mode and target; budget mode turns --target-bpw / --target-size into bytes of
    the quantizable tensors (fixed tensors, and for sizes the header, come off first)."""
    mode = mode.lower()
    if mode == "threshold":
        if target_bpw is not None or target_size is not None:
            raise PolicyError("--target-bpw/--target-size need --policy budget")
        return threshold or ThresholdPolicy()
    if mode != "budget":
        raise PolicyError(f"unknown policy {mode!r} (threshold or budget)")
    if (target_bpw is None) == (target_size is None):
        raise PolicyError("budget policy needs exactly one of --target-bpw or --target-size")
    fixed = fixed_bytes(prof)
    if target_bpw is not None:
        plan = budget_for_bpw(float(target_bpw), int(prof.model["n_params"]), fixed)
    else:
        plan = budget_for_size(parse_size(target_size), fixed, header_overhead(model, len(prof.tensors)),
                               f"size={target_size}")
    return BudgetPolicy(plan.budget_bytes, plan.target)


def plan_auto(model: "str | os.PathLike[str]", prof: Profile, policy: ThresholdPolicy | BudgetPolicy | None,
              overrides: Sequence[tuple[str, str]] = (), *, model_sha256: str | None = None) -> AutoPlan:
    """Apply `policy` (None: keep the profile's recorded choices, which reproduces its quantization) and
    `overrides`, check the profile belongs to the model, and pick the closest llama.cpp file type."""
    if model_sha256 is not None and prof.model.get("sha256") != model_sha256:
        raise QuantGateError(f"the profile was made for model {prof.model.get('sha256', '?')[:12]}..., "
                             f"not {model_sha256[:12]}... (run quantgate profile on this model)")
    if policy is not None:
        apply_policy(prof, policy, overrides)
    elif overrides:
        raise PolicyError("overrides need a policy to re-apply (pass --policy)")
    types = prof.chosen_types()
    total = int(prof.summary.get("tensor_bytes") or 0)
    mix = closest_mix(mix_sizes(model), total)
    prof.summary["file_type_mix"] = mix
    record = {"policy": prof.policy, "overrides": prof.overrides, "profile_sha256": prof.sha256(),
              "tensor_bytes": total, "bits_per_weight": prof.summary.get("bits_per_weight"),
              "imatrix_digest": prof.imatrix.get("digest") if prof.imatrix.get("used") else None,
              "file_type_mix": mix}
    return AutoPlan(prof, types, mix, canonical_json(record))


@contextmanager
def auto_request(model: "str | os.PathLike[str]", out: "str | os.PathLike[str]", *,
                 profile: "str | os.PathLike[str] | None" = None, calib: "str | os.PathLike[str] | None" = None,
                 policy: str | None = None, target_bpw: float | None = None, target_size: str | None = None,
                 threshold: ThresholdPolicy | None = None, overrides: Sequence[tuple[str, str]] = (),
                 imatrix: "str | os.PathLike[str] | None" = None, cache_dir: "str | os.PathLike[str] | None" = None,
                 profile_out: "str | os.PathLike[str] | None" = None, threads: int | None = None,
                 progress: ProgressFn | None = None) -> Iterator[tuple[Any, AutoPlan]]:
    """Everything `quantize --precision auto` needs: load `profile` (or build one on `calib`, cached, reporting
    to `progress`), apply the policy (none given with a profile: its recorded choices), and yield
    (QuantizeRequest, AutoPlan). The imatrix the estimates assumed is used for quantizing: `imatrix` (its content
    must match) or, for a collected one, the cached copy written to a temporary file."""

    model = Path(model)
    with open_checkpoint(model, allow_requantize=True) as ckpt:
        sha = model_identity(ckpt)
    imat = load_imatrix(imatrix) if imatrix is not None else None
    with CalibrationCache(cache_dir) as cache, tempfile.TemporaryDirectory(prefix="quantgate-auto-") as tmp:
        if profile is not None:
            prof = Profile.load(profile)
        else:
            prof = build_profile(model, Path(calib) if calib else DEFAULT_CALIBRATION, imatrix=imat,
                                 imatrix_label=str(imatrix or ""), cache=cache, progress=progress)
        pol = None
        if policy is not None or profile is None or target_bpw is not None or target_size is not None:
            mode = policy or ("budget" if target_bpw is not None or target_size is not None else "threshold")
            pol = make_policy(prof, model, mode=mode, target_bpw=target_bpw, target_size=target_size,
                              threshold=threshold)
        plan = plan_auto(model, prof, pol, overrides, model_sha256=sha)
        imat_path = Path(imatrix) if imatrix is not None else None
        info = prof.imatrix
        if info.get("used"):
            if imat is None and info.get("source") == "collected":
                imat = cached_imatrix(model, Path(prof.calibration["path"]), sha, chunk_size=info["chunk_size"],
                                      n_chunks=info.get("n_chunks"), cache=cache, tool_version=__version__,
                                      matmul_dtype=info.get("matmul", "float32"))
                imat_path = Path(tmp) / "imatrix.gguf"
                save_imatrix_gguf(imat, imat_path)
            if imat is None or imatrix_digest(imat) != info.get("digest"):
                raise QuantGateError("the profile's error estimates assume an importance matrix "
                                     f"({info.get('source')}, digest {str(info.get('digest'))[:12]}...): pass that "
                                     "file with --imatrix (quantgate profile --imatrix-out writes it)")
        elif imat is not None:
            raise QuantGateError("the profile was made without an importance matrix; drop --imatrix or re-profile")
        if profile_out is not None:
            plan.profile.save(profile_out)
        req = QuantizeRequest(source=model, out=Path(out), precision=AUTO, imatrix=imat_path,
                              threads=threads, type_map=tuple(sorted(plan.type_map.items())),
                              file_type_mix=plan.file_type_mix, policy=plan.policy_json)
        yield req, plan
