"""One model over several mixes, as plain functions: prepare -> profile -> quantize -> validate -> register.

Every step is idempotent by job key (SHA-256 of source SHA-256 + recipe key + tool version): a step whose output
already exists returns it instead of redoing it, so retries, redelivered Celery messages and reruns are safe.
Records returned are JSON-ready dicts (what Celery results carry); files live under `workdir/<job key>/`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from analyzer.auto import auto_request, mix_sizes
from analyzer.profile import Profile, build_profile
from core.atomic import atomic_write_text
from core.errors import QuantGateError
from core.hashing import canonical_json, checkpoint_sha256, file_sha256, sha256_text
from core.progress import ProgressFn
from core.records import (
    QuantizedArtifact,
    QuantizeRequest,
    Recipe,
    Verdict,
    is_auto,
    job_key,
)
from core.text import one_line
from core.version import __version__
from quant.gguf_split import check_split_fields, split_tag
from quant.loaders import open_checkpoint
from quant.mixes import get_mix
from quantgate.config import registry_settings
from quantgate.inputs import check_reference, is_repo_url, names_remote_source
from quantgate.pipeline import quantize_model, validate_artifact
from runtime.datasets import DEFAULT_CALIBRATION
from validation.thresholds import gates_from_config

ARTIFACT_JSON = "artifact.json"
VERDICT_JSON = "verdict.json"
DEFAULT_AUTO_TARGET = "Q4_K_M"  # the AUTO mix's budget: no more tensor data than this llama.cpp mix
PROFILE_OPTIONS = ("calib", "chunk_size", "measure_seqs", "measure_len")


@dataclass(frozen=True)
class JobSpec:
    """What to do for one model: which mixes, where to put files, which gates, whether to register."""

    model: str
    mixes: tuple[str, ...]
    workdir: str = "out/jobs"
    gates: Mapping[str, Any] | Sequence[str] | None = None  # thresholds for the validation gate; None skips validation
    dataset: str | None = None               # eval JSONL for validation (None: the gate's default)
    register: bool = False
    model_name: str | None = None
    profile: bool = False                    # build the sensitivity profile (implied by an AUTO mix)
    options: Mapping[str, Any] = field(default_factory=dict)  # extra keyword arguments for validate()
    profile_options: Mapping[str, Any] = field(default_factory=dict)  # calib, chunk_size, measure_seqs, measure_len
    auto_target: str = DEFAULT_AUTO_TARGET   # AUTO budget: a mix name, bits per weight ("4.5") or size ("3.9GB")
    source_name: str | None = None           # the source's own name (outputs, default registered name): `run --model X`
    source_lineage: str | None = None        # where the source came from (quantgate.inputs), written into each GGUF
    #: `model` is a reference the worker resolves (models:/..., a Hub id, a path in model_repo), not a path
    model_ref: bool = False
    model_repo: str | None = None            # with model_ref: the DVC repository (git URL, or a path on the workers)
    model_rev: str | None = None             # with model_ref: its git revision, or the Hub revision
    #: write split GGUFs: QuantizeRequest's split fields (quant.gguf_split.split_options); {} for single files
    split: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mixes"] = list(self.mixes)
        d["gates"] = _plain(self.gates) if self.gates is not None else None
        d["options"] = dict(self.options)
        d["profile_options"] = dict(self.profile_options)
        d["split"] = dict(self.split)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "JobSpec":
        """The inverse of to_dict (what crosses Redis)."""
        return cls(**{**d, "mixes": tuple(d["mixes"]), "options": dict(d.get("options") or {}),
                      "profile_options": dict(d.get("profile_options") or {}),
                      "split": check_split_fields(d.get("split"))})

    @property
    def needs_profile(self) -> bool:
        """Whether the job builds the profile: asked for, or needed by an AUTO mix."""
        return self.profile or any(is_auto(m) for m in self.mixes)


def _plain(gates: Any) -> Any:
    """Gates as JSON-ready data: a mapping stays a dict, a list of "metric <= x" strings stays a list."""
    return dict(gates) if isinstance(gates, Mapping) else list(gates)


def step_available(step: str) -> bool:
    """Whether a step's implementation is installed (profile: analyzer, validate: validation.gate)."""
    module = {"profile": "analyzer.profile", "validate": "validation.gate", "register": "registry.registration",
              "quantize": "quantgate.pipeline", "prepare": "quant.loaders"}[step]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- identity


def source_identity(model: "str | os.PathLike[str]") -> dict[str, Any]:
    """Open a checkpoint (fails fast with CheckpointError when missing or corrupt) and return its identity."""

    path = Path(model)
    with open_checkpoint(path, allow_requantize=True) as ckpt:
        return {"path": str(path), "kind": ckpt.kind, "sha256": checkpoint_sha256(ckpt.files),
                "files": sorted(str(Path(f).name) for f in ckpt.files)}


def mix_recipe(mix: str) -> Recipe:
    """The recipe `quantize_model` builds for a plain named mix (UnsupportedTypeError for an unknown name)."""

    return Recipe(precision=get_mix(mix).name)


def mix_job_key(source_sha256: str, mix: str) -> str:
    """The job key of quantizing that source with that mix, known before any work is done."""

    return job_key(source_sha256, mix_recipe(mix), __version__)


# ---------------------------------------------------------------------------------------------- locking


@contextlib.contextmanager
def job_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on a lock file beside `folder` (.<name>.lock, outside it so a DVC output folder holds only
    results): one writer per job key at a time, released by the kernel when its process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    with _flock(folder.parent / f".{folder.name}.lock"):
        yield


@contextlib.contextmanager
def _flock(lockfile: Path) -> Iterator[None]:
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_orphan_temps(folder: Path) -> list[str]:
    """Temp files left by a writer that died (we hold the lock, so no live writer owns them)."""
    removed = []
    for p in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return removed


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finished_artifact(folder: Path) -> dict[str, Any] | None:
    """The artifact record of a finished quantization in `folder`, if its GGUF is there with the recorded size."""
    rec = _read_json(folder / ARTIFACT_JSON)
    if not rec:
        return None
    try:
        files = [(Path(p["path"]), p["nbytes"]) for p in rec.get("parts") or []] or [(Path(rec["path"]), rec["nbytes"])]
        if all(f.stat().st_size == n for f, n in files):
            return rec
    except (OSError, KeyError, TypeError):
        pass
    return None


def _same_layout(rec: Mapping[str, Any], split: Mapping[str, int]) -> bool:
    """Whether a finished artifact is laid out as asked (a split set for a split request, one file otherwise)."""
    return bool(rec.get("parts")) == bool(split) and rec.get("split", {}) == dict(split)


# ---------------------------------------------------------------------------------------------- steps


def quantize_step(model: "str | os.PathLike[str]", mix: str, *, workdir: "str | os.PathLike[str]" = "out/jobs",
                  out_dir: "str | os.PathLike[str] | None" = None, name: str | None = None,
                  on_progress: ProgressFn | None = None, source_lineage: str | None = None,
                  split: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Quantize `model` with `mix` into out_dir (default workdir/<job key>, workdir/<job key>-split-... for a split
    GGUF: split = QuantizeRequest's split fields), or return the finished artifact.

    Holds the job's lock while working, so a redelivered copy of the same job waits and then returns the first
    copy's artifact; temp files of a writer that died are removed; the GGUF appears only complete (atomic rename).
    """

    ident = source_identity(model)
    recipe = mix_recipe(mix)
    key = mix_job_key(ident["sha256"], mix)
    split = check_split_fields(split)
    tag = split_tag(split)
    folder = Path(out_dir) if out_dir is not None else Path(workdir) / (f"{key}-{tag}" if tag else key)
    with job_lock(folder):
        done = _finished_artifact(folder)
        if done is not None and done.get("job_key") == key and _same_layout(done, split):
            return {**done, "reused": True}
        _remove_orphan_temps(folder)
        stem = name or Path(ident["path"]).name.removesuffix(".gguf") or "model"
        out = folder / f"{stem}-{recipe.precision}.gguf"
        cb = None
        if on_progress is not None:
            def cb(i: int, n: int, _tensor: str) -> None:
                on_progress(i, n, "quantize")
        art = quantize_model(QuantizeRequest(source=Path(model), out=out, precision=recipe.precision,
                                             source_lineage=source_lineage, **split), on_tensor=cb)
        if art.job_key != key:  # the pipeline's recipe drifted from mix_recipe(): a bug, not bad input
            raise RuntimeError(f"job key mismatch for {mix}: planned {key[:12]}, pipeline {art.job_key[:12]}")
        rec = {**art.to_dict(), **({"split": split} if split else {})}
        atomic_write_text(folder / ARTIFACT_JSON, json.dumps(rec, indent=2, sort_keys=True) + "\n")
        return {**rec, "reused": False}


def gate_set_key(gates: Any, dataset: str | None, options: Mapping[str, Any] | None = None) -> str:
    """Content key of a gate configuration: same thresholds + dataset + options -> same verdict file."""

    g = dict(gates) if isinstance(gates, Mapping) else list(gates)
    return sha256_text(canonical_json({"gates": g, "dataset": dataset, "options": dict(options or {})}))


def validate_step(artifact: Mapping[str, Any], *, baseline: "str | os.PathLike[str]", gates: Any,
                  dataset: str | None = None, options: Mapping[str, Any] | None = None,
                  out: "str | os.PathLike[str] | None" = None,
                  on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the validation gate on an artifact against its baseline (quantgate.pipeline.validate_artifact, which
    also appends the "validate" audit event). The verdict JSON is kept beside the GGUF as verdict-<gate key>.json
    with its reports (validation.json/.md/.html, junit.xml) under reports-<gate key>/<artifact sha256>/, so the
    same artifact + gates returns the stored verdict and another gate set never overwrites it. A failed gate is
    a result (passed: false), not an error."""
    if not step_available("validate"):
        raise QuantGateError("the validate step needs validation/gate.py (issue 5), which is not installed")

    gkey = gate_set_key(gates, dataset, options)
    gguf = Path(artifact["path"])
    target = Path(out) if out is not None else gguf.parent / f"verdict-{gkey[:16]}.json"
    report_dir = target.parent / ("reports" if out is not None else f"reports-{gkey[:16]}")
    prev = _read_json(target)
    if out is None and prev and prev.get("artifact_sha256") == artifact["sha256"]:
        return {**prev, "reused": True}
    gate_set = gates_from_config(_plain(gates) if isinstance(gates, Mapping) else {"gates": list(gates)})
    kwargs: dict[str, Any] = dict(options or {})
    if dataset is not None:
        kwargs["dataset"] = dataset
    if on_progress is not None:
        kwargs["progress"] = lambda d, n, msg: on_progress(d, n, f"validate: {msg}")
    kwargs.setdefault("data_docs", False)
    verdict = validate_artifact(Path(baseline), gguf, gate_set, report_dir=report_dir, **kwargs)
    rec = verdict.to_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return {**rec, "reused": False}


def register_step(artifact: Mapping[str, Any], verdict: Mapping[str, Any] | None = None, *,
                  model_name: str | None = None, source_name: str | None = None) -> dict[str, Any]:
    """Register the artifact (with its verdict, its validation reports and a compliance report in the version's run)
    in the model registry; idempotent per artifact + job key. A version
    that passed the gate also gets its mix's alias (e.g. q4_k_m, auto) through registry.registration.promote, audited;
    failed and unvalidated versions stay registered without one. Only the call that creates the version promotes it,
    so reruns and redelivered tasks append no second promote event."""
    from registry.facts import verdict_reports  # lazy: with the registration below
    from registry.registration import (  # lazy: SQLAlchemy/MLflow load at first use (light worker start)
        promote,
        register_gguf,
    )

    v = Verdict.from_dict(verdict) if verdict else None
    art = QuantizedArtifact.from_dict(artifact)
    settings = registry_settings()
    rv = register_gguf(art.path, settings=settings, verdict=v, artifact=art, model_name=model_name,
                       source_name=source_name, reports=verdict_reports(v), compliance=True)
    out = rv.to_dict()
    if v is not None and v.passed and rv.created:  # a rerun finds the version (and its alias) already there
        alias = art.recipe.precision.lower()
        promote(rv.model_name, rv.version, alias, settings=settings, reason="pipeline: validated mix")
        out["alias"] = alias
    return out


def profile_key(source_sha256: str, options: Mapping[str, Any] | None = None) -> str:
    """Content key of a profile: same source + profile options (calibration file content included) -> same file."""

    opts = dict(options or {})
    calib = opts.get("calib")
    if calib is not None and Path(calib).is_file():
        opts["calib_sha256"] = file_sha256(calib)
    return sha256_text(canonical_json({"source": source_sha256, "options": opts}))


def profile_step(model: "str | os.PathLike[str]", *, workdir: "str | os.PathLike[str]" = "out/jobs",
                 out: "str | os.PathLike[str] | None" = None, calib: str | None = None,
                 options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per-tensor sensitivity profile of the source model (analyzer, issue 4), cached by source SHA-256
    and profile options as workdir/profile-<key>.json. options: calib, chunk_size, measure_seqs, measure_len."""
    if not step_available("profile"):
        raise QuantGateError("the profile step needs analyzer/profile.py (issue 4), which is not installed")

    opts = {k: v for k, v in dict(options or {}).items() if k in PROFILE_OPTIONS and v is not None}
    if calib is not None:
        opts["calib"] = calib
    unknown = set(dict(options or {})) - set(PROFILE_OPTIONS)
    if unknown:
        raise QuantGateError(f"unknown profile option(s) {sorted(unknown)} (known: {', '.join(PROFILE_OPTIONS)})")
    ident = source_identity(model)
    key = profile_key(ident["sha256"], opts)
    target = Path(out) if out is not None else Path(workdir) / f"profile-{key[:16]}.json"
    with _flock(target.parent / f".{target.name}.lock"):
        if out is None and _read_json(target) is not None:
            return {"path": str(target), "key": key, "reused": True}
        kw = {k: int(opts[k]) for k in ("chunk_size", "measure_seqs", "measure_len") if k in opts}
        prof = build_profile(Path(model), Path(opts.get("calib") or DEFAULT_CALIBRATION), **kw)
        target.parent.mkdir(parents=True, exist_ok=True)
        prof.save(target)
    return {"path": str(target), "key": key, "reused": False}


def auto_budget(model: "str | os.PathLike[str]", target: str, n_params: int) -> dict[str, Any]:
    """The AUTO mix's budget as auto_request keywords: a llama.cpp mix name -> that mix's bits per weight on this
    model (so the auto file holds no more tensor data than the mix would); a bare number -> bits per weight;
    anything else -> a file size ("3.9GB", "500MiB")."""

    t = str(target).strip()
    sizes = mix_sizes(model)
    if t.upper() in sizes:
        return {"target_bpw": 8.0 * sizes[t.upper()] / max(n_params, 1)}
    try:
        return {"target_bpw": float(t)}
    except ValueError:
        return {"target_size": t}


def quantize_auto_step(model: "str | os.PathLike[str]", profile: "str | os.PathLike[str]", *,
                       target: str = DEFAULT_AUTO_TARGET, workdir: "str | os.PathLike[str]" = "out/jobs",
                       out_dir: "str | os.PathLike[str] | None" = None, name: str | None = None,
                       on_progress: ProgressFn | None = None, source_lineage: str | None = None,
                       split: Mapping[str, int] | None = None) -> dict[str, Any]:
    """`quantize --precision auto --profile P --policy budget` for one model, idempotent like quantize_step
    (split: as there).

    The job key of an auto file depends on the types the policy picks, known only after planning, so the folder
    is workdir/auto-<plan key> (source SHA-256 + profile SHA-256 + target + tool version); artifact.json inside
    records the file's real job key."""

    ident = source_identity(model)
    plan_key = sha256_text(canonical_json({"source": ident["sha256"], "profile": file_sha256(profile),
                                           "target": str(target), "tool": __version__}))
    split = check_split_fields(split)
    tag = split_tag(split)
    folder = Path(out_dir) if out_dir is not None else \
        Path(workdir) / (f"auto-{plan_key[:32]}-{tag}" if tag else f"auto-{plan_key[:32]}")
    with job_lock(folder):
        done = _finished_artifact(folder)
        if done is not None and done.get("plan_key") == plan_key and _same_layout(done, split):
            return {**done, "reused": True}
        _remove_orphan_temps(folder)
        budget = auto_budget(model, target, int(Profile.load(profile).model["n_params"]))
        stem = name or Path(ident["path"]).name.removesuffix(".gguf") or "model"
        cb = None
        if on_progress is not None:
            def cb(i: int, n: int, _tensor: str) -> None:
                on_progress(i, n, "quantize")
        with auto_request(model, folder / f"{stem}-AUTO.gguf", profile=profile, policy="budget",
                          **budget) as (req, plan):
            art = quantize_model(replace(req, source_lineage=source_lineage, **split), on_tensor=cb)
        rec = {**art.to_dict(), **({"split": split} if split else {}), "plan_key": plan_key,
               "auto": {"target": str(target), **budget, "file_type_mix": plan.file_type_mix,
                        "profile": str(profile)}}
        atomic_write_text(folder / ARTIFACT_JSON, json.dumps(rec, indent=2, sort_keys=True) + "\n")
        return {**rec, "reused": False}


def quantize_for(spec: "JobSpec", mix: str, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Quantize one mix of a job: a named llama.cpp mix, or AUTO from the job's (cached) profile."""
    if is_auto(mix):
        prof = profile_step(spec.model, workdir=spec.workdir, options=spec.profile_options)
        return quantize_auto_step(spec.model, prof["path"], target=spec.auto_target, workdir=spec.workdir,
                                  name=spec.source_name or spec.model_name, on_progress=on_progress,
                                  source_lineage=spec.source_lineage, split=spec.split)
    return quantize_step(spec.model, mix, workdir=spec.workdir, name=spec.source_name or spec.model_name,
                         on_progress=on_progress, source_lineage=spec.source_lineage, split=spec.split)


def check_mixes(spec: "JobSpec") -> None:
    """Fail before any work on an empty or unknown mix list (AUTO is known)."""
    if not spec.mixes:
        raise QuantGateError("a job needs at least one mix")
    for m in spec.mixes:
        if not is_auto(m):
            mix_recipe(m)


class JobPathError(QuantGateError):
    """A job names a path a worker may not touch: a model or dataset outside the model roots, or a workdir or
    artifact outside the configured workdir. Bad input: the task fails at once, never retried."""


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_read_path(path: "str | os.PathLike[str]", settings: Any, what: str = "model") -> Path:
    """`path` resolved (symlinks and `..` followed), or JobPathError when it lies outside settings.model_root_paths
    (QUANTGATE_MODEL_ROOTS; default the current directory) and outside the datasets shipped with quantgate."""
    p = Path(path).expanduser().resolve()
    roots = list(settings.model_root_paths)
    if _inside(p, roots + [DEFAULT_CALIBRATION.parent.resolve()]):
        return p
    where = os.pathsep.join(str(r) for r in roots)
    raise JobPathError(f"{what} {one_line(path, 200)} lies outside the model roots ({one_line(where, 200)}); "
                       "set QUANTGATE_MODEL_ROOTS on the worker to allow it")


def check_write_path(path: "str | os.PathLike[str]", settings: Any, what: str = "workdir") -> Path:
    """`path` resolved, or JobPathError when it lies outside settings.workdir (QUANTGATE_WORKDIR)."""
    p = Path(path).expanduser().resolve()
    root = Path(settings.workdir).expanduser().resolve()
    if _inside(p, [root]):
        return p
    raise JobPathError(f"{what} {one_line(path, 200)} lies outside the configured workdir ({one_line(root, 200)}); "
                       "set QUANTGATE_WORKDIR on the worker to allow it")


def check_source_ref(value: Any, repo: Any, rev: Any, settings: Any) -> None:
    """A model reference a worker is asked to resolve (a Celery message is hostile input): the resolver's own checks
    (quantgate.inputs.check_reference), and what it names on this machine under the model roots (a local DVC
    repository; a value that is a plain path here)."""
    check_reference(value, repo, rev)
    if repo:
        if not is_repo_url(str(repo)):
            check_read_path(repo, settings, "model repository")
    elif not names_remote_source(str(value)):
        check_read_path(value, settings, "model")


def check_job_paths(spec: "JobSpec | Mapping[str, Any]", settings: Any, *, model: bool = True) -> None:
    """What a worker may touch for this job: the model, eval dataset and calibration file under the model roots,
    the workdir under the configured workdir; a model reference (model_ref) passes check_source_ref instead.
    `model=False` skips the model: a task reading its pinned source from this worker's own input cache. Called by
    every Celery task and by `submit` before sending; the in-process `quantgate run` does not call it (a CLI
    user's own paths are theirs to use)."""
    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_dict(spec)
    if spec.model_ref:
        check_source_ref(spec.model, spec.model_repo, spec.model_rev, settings)
    elif model:
        check_read_path(spec.model, settings, "model")
    if spec.dataset:
        check_read_path(spec.dataset, settings, "dataset")
    calib = (spec.profile_options or {}).get("calib")
    if calib:
        check_read_path(calib, settings, "calibration file")
    check_write_path(spec.workdir, settings, "workdir")


def run_mix(spec: JobSpec, mix: str, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """quantize -> validate -> register for one mix of a job; returns {mix, job_key, artifact, verdict, version}."""
    art = quantize_for(spec, mix, on_progress)
    verdict = None
    if spec.gates is not None:
        verdict = validate_step(art, baseline=spec.model, gates=spec.gates, dataset=spec.dataset,
                                options=spec.options, on_progress=on_progress)
    version = register_step(art, verdict, model_name=spec.model_name, source_name=spec.source_name) \
        if spec.register else None
    return {"mix": mix, "job_key": art["job_key"], "artifact": art, "verdict": verdict, "version": version}


def run_job(spec: JobSpec | Mapping[str, Any], on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """The whole pipeline for one model over its mixes, in this process; safe to rerun (nothing is redone)."""
    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_dict(spec)
    check_mixes(spec)
    ident = source_identity(spec.model)
    profile = profile_step(spec.model, workdir=spec.workdir, options=spec.profile_options) \
        if spec.needs_profile else None
    results = [run_mix(spec, m, on_progress) for m in spec.mixes]
    return {"model": spec.model, "source_sha256": ident["sha256"], "profile": profile["path"] if profile else None,
            "results": results}


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One comparable row per mix: what must be identical whichever runner produced it."""
    rows = []
    for r in results:
        a = r["artifact"]
        rows.append({"mix": r["mix"], "job_key": r["job_key"], "sha256": a["sha256"], "nbytes": a["nbytes"],
                     "bits_per_weight": a["bits_per_weight"],
                     "passed": None if not r.get("verdict") else r["verdict"].get("passed"),
                     "version": None if not r.get("version") else r["version"].get("version")})
    return rows
