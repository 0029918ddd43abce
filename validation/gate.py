"""The validation gate: structural gates, then expectation suites, then evaluation + metric gates -> one Verdict.

Order (cheapest first): structural gates on the file; if any fails, nothing else runs (the rest are recorded as
skipped). Then the dataset suite (before spending time on models), the evaluation, the per-tensor suite (it needs
the evaluation's per-tensor errors) and the metric gates. Exit codes: 0 every gate passed, 1 a gate failed,
2 the inputs are unusable (missing, corrupt, truncated, mismatched model, bad dataset or gate file): then the report
folder holds only error.json. Reports: validation.publish.publish (layout in docs/VALIDATION.md).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from core.atomic import atomic_write_text
from core.errors import QuantGateError
from core.paths import file_kind
from core.progress import ProgressFn
from core.records import GateResult, Verdict
from quant.loaders import open_checkpoint
from quant.model_plan import plan_model
from runtime.datasets import DEFAULT_CALIBRATION, DEFAULT_EVAL, load_dataset
from validation import publish
from validation.evaluate import evaluate, model_sha256
from validation.expectations import dataset_table, find_suites, run_suites, tensor_table
from validation.junit import error_junit_xml
from validation.structural import structural_gates
from validation.thresholds import GateSet, evaluate_gates, expand

EXIT_PASSED, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


class UnusableInput(QuantGateError):
    """The inputs cannot be validated at all (exit 2); `error_path` is the error record written, if any."""

    def __init__(self, message: str, error_path: Path | None = None) -> None:
        super().__init__(message)
        self.error_path = error_path


@dataclass
class Validation:
    """Everything one validation run produced: the verdict and the material its reports are made from."""

    verdict: Verdict
    gate_set: GateSet
    baseline: str
    baseline_sha256: str
    facts: Any                                   # validation.structural.CandidateFacts
    eval_report: Any = None                      # validation.eval_report.EvalReport, None when evaluation was skipped
    dataset_path: str = ""
    notes: list[str] = field(default_factory=list)


def exit_code(verdict: Verdict) -> int:
    """0 when every gate passed, else 1 (unusable inputs raise UnusableInput -> 2 before a verdict exists)."""
    return EXIT_PASSED if verdict.passed else EXIT_FAILED


def _skipped(gates: GateSet, why: str) -> list[GateResult]:
    return [GateResult(name=g.name, kind="metric", metric=g.metric, comparator=g.comparator, threshold=g.threshold,
                       category=g.category, skipped=True, detail=f"skipped: {why}") for g in expand(gates, [])]


def _model_tensor_names(baseline: Path) -> list[str]:

    with open_checkpoint(baseline, allow_requantize=True) as ckpt:
        return [t.name for t in plan_model(ckpt).tensors]


def run_validation(
    baseline: "str | os.PathLike[str]",
    candidate: "str | os.PathLike[str]",
    gates: GateSet,
    *,
    dataset: "str | os.PathLike[str] | None" = None,
    calibration: "str | os.PathLike[str] | None" = None,
    backend: str = "torch",
    max_tokens: int = 256,
    batch_size: int = 8,
    cache_dir: "str | os.PathLike[str] | None" = None,
    manifest: "str | os.PathLike[str] | None" = None,
    expect_sha256: str | None = None,
    expectations: bool = True,
    suites_dirs: Iterable["str | os.PathLike[str]"] = (),
    docs_dir: "str | os.PathLike[str] | None" = None,
    progress: ProgressFn | None = None,
) -> Validation:
    """Run every gate on `candidate` and return the Validation (no files written except GX Data Docs into
    `docs_dir`); raises QuantGateError when an input is unusable."""

    steps = ("structural gates", "dataset expectations", "evaluation", "tensor expectations")

    def say(step: str) -> None:
        if progress is not None:
            progress(steps.index(step), len(steps), step)

    baseline, candidate = Path(baseline), Path(candidate)
    if not baseline.exists():
        raise QuantGateError(f"baseline not found: {baseline}")
    for p in (baseline, candidate):
        if p.exists() and not p.is_file() and not p.is_dir():
            raise QuantGateError(f"{p}: not a regular file or a folder")
    ds_path = Path(dataset) if dataset is not None else DEFAULT_EVAL
    cal_path = Path(calibration) if calibration is not None else (
        DEFAULT_CALIBRATION if dataset is None and DEFAULT_CALIBRATION.exists() else None)
    say("structural gates")
    base_sha = model_sha256(baseline)
    facts, results = structural_gates(candidate, baseline=baseline, baseline_sha256=base_sha, manifest=manifest,
                                      expected_sha=expect_sha256)
    eval_ds = load_dataset(ds_path)
    cal_ds = load_dataset(cal_path) if cal_path is not None else None
    suites = []
    if expectations:

        suites = find_suites(suites_dirs)
    v = Validation(verdict=Verdict(facts.sha256, False, [], gates.label), gate_set=gates, baseline=str(baseline),
                   baseline_sha256=base_sha, facts=facts, dataset_path=str(ds_path))
    if not all(r.passed for r in results):
        why = "a structural gate failed"
        results += [GateResult(name=f"expectation:{s.name}", kind="expectation", skipped=True,
                               detail=f"skipped: {why}") for s in suites]
        results += _skipped(gates, why)
        return _finish(v, results)
    params = {"allowed_categories": sorted({"code", "chat", "math"} | set(eval_ds.categories())),
              "min_chars": 1, "max_chars": 8000}
    if suites:

        say("dataset expectations")
        results += run_suites({"dataset": dataset_table(eval_ds, cal_ds)}, suites, params, docs_dir=docs_dir)
    say("evaluation")
    report = evaluate(baseline, candidate, eval_ds, backend=backend, max_tokens=max_tokens, batch_size=batch_size,
                      cache_dir=cache_dir)
    v.eval_report = report
    if suites:

        say("tensor expectations")
        names = _model_tensor_names(baseline)
        results += run_suites({"tensors": tensor_table(report.per_tensor)}, suites,
                              {**params, "n_model_tensors": len(names), "model_tensor_names": names},
                              docs_dir=docs_dir)
    results += evaluate_gates(gates, report)
    return _finish(v, results)


def _finish(v: Validation, results: list[GateResult]) -> Validation:
    v.verdict.gates = results
    v.verdict.passed = bool(results) and all(r.passed and not r.skipped for r in results)
    v.verdict.created_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if v.eval_report is not None:
        m = v.eval_report.overall.to_dict()
        v.verdict.metrics = {k: float(x) for k, x in m.items() if isinstance(x, (int, float))}
    v.verdict.metrics["gates_failed"] = float(sum(1 for r in results if not r.passed))
    return v


def check_inputs(baseline: "str | os.PathLike[str]", candidate: "str | os.PathLike[str]") -> None:
    """Refuse, before anything is written, a candidate that exists but is not a regular file or a baseline that
    exists but is neither a regular file nor a folder: the error record would otherwise land beside /dev/null or a
    FIFO. A missing input passes: validation then writes its error record (error.json, a JUnit error), which is
    what a CI job whose artifact was never produced needs to see."""
    for role, path, folder_ok in (("candidate", candidate, False), ("baseline", baseline, True)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise UnusableInput(f"{os.fspath(path)}: {role} unreadable ({e.strerror or e})") from None
        if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
            continue
        want = "a GGUF file or a model folder" if folder_ok else "a GGUF file"
        raise UnusableInput(f"{os.fspath(path)}: {role} is {file_kind(st.st_mode)}, not {want}; nothing written")


def gate_and_report(
    baseline: "str | os.PathLike[str]",
    candidate: "str | os.PathLike[str]",
    gates: GateSet,
    *,
    report_dir: "str | os.PathLike[str] | None" = None,
    junit: "str | os.PathLike[str] | None" = None,
    data_docs: bool = False,
    **kwargs: Any,
) -> Verdict:
    """Validate `candidate` against `baseline` with `gates` and write the reports (validation.json/.md/.html,
    verdict.json, junit.xml; with data_docs, GX's own Data Docs in gx/) atomically into report_dir/<artifact sha256>/ (default
    <candidate>.reports/); returns the Verdict (report paths filled in). Unusable inputs: error.json only, then
    UnusableInput. kwargs: see run_validation."""

    check_inputs(baseline, candidate)
    candidate = Path(candidate)
    # absolute from here on: Great Expectations' Data Docs site refuses a relative base_directory, and the
    # report paths recorded in the verdict must not depend on the working directory of whoever reads them
    root = (Path(report_dir) if report_dir is not None else publish.default_report_root(candidate)).resolve()
    key = publish.artifact_key(candidate)
    staging = publish.Staging(root, key)
    try:
        with staging:
            try:
                v = run_validation(baseline, candidate, gates,
                                   docs_dir=staging.path / "gx" if data_docs and kwargs.get("expectations", True)
                                   else None, **kwargs)
            except QuantGateError as e:
                staging.reset()
                publish.write_error(staging.path, e, candidate=candidate, baseline=Path(baseline), sha256=key)
                staging.publish()
                if junit is not None:

                    atomic_write_text(junit, error_junit_xml(str(e)))
                raise UnusableInput(str(e), staging.final / "error.json") from e
            publish.write_reports(staging.path, v, final=staging.final, junit_copy=junit)
            staging.publish()
            return v.verdict
    finally:
        staging.cleanup()


__all__ = ["EXIT_PASSED", "EXIT_FAILED", "EXIT_UNUSABLE", "UnusableInput", "Validation", "check_inputs", "exit_code",
           "run_validation", "gate_and_report"]
