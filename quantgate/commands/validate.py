"""`quantgate validate` (the CI gate) and `quantgate diff` (two quantized versions side by side).

Heavy imports (torch, pandas, great_expectations, matplotlib) happen inside the commands, never at CLI start.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from quantgate.cli_app import app, console, err_console, fail, handle_errors, lit


def _progress(quiet: bool):
    return None if quiet else (lambda _done, _total, msg: err_console.print(f"[dim]validate: {lit(msg)}[/]", highlight=False))


@app.command()
@handle_errors
def validate(
    baseline: str = typer.Option(..., "--baseline", "-b", help="Baseline: HF model folder or F32/F16/BF16 GGUF (or a "
                                                               "Hub id in the HF cache, models:/NAME/VERSION, "
                                                               "models:/NAME@ALIAS)"),
    quantized: str = typer.Option(..., "--quantized", help="Quantized GGUF to gate (or models:/NAME@ALIAS, "
                                                           "models:/NAME/VERSION)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Gate: METRIC <= THRESHOLD (overall)"),
    metric: str = typer.Option("accuracy_drop", "--metric", help="Metric of --threshold (docs/METRICS.md)"),
    gates_file: Optional[Path] = typer.Option(None, "--gates", help="Gate set YAML (gates.yaml or params.yaml)"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Eval JSONL (default: data/eval.jsonl)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="Calibration JSONL checked for overlap with the eval set"),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir",
                                              help="Reports go to DIR/<sha256>/ (default: <quantized>.reports/)"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML (one testcase per gate) here"),
    backend: str = typer.Option("torch", "--backend", help="Candidate runner: torch | llama.cpp"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per sample, BOS included"),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward pass"),
    manifest: Optional[Path] = typer.Option(None, "--manifest",
                                            help="Artifact record / sha256sum file: the expected SHA-256"),
    expect_sha256: Optional[str] = typer.Option(None, "--expect-sha256", help="The expected SHA-256 of the GGUF"),
    suites: List[Path] = typer.Option([], "--suites", help="Extra folder of GX suite JSON files (repeatable)"),
    no_expectations: bool = typer.Option(False, "--no-expectations", help="Skip the Great Expectations suites"),
    data_docs: bool = typer.Option(False, "--data-docs",
                                   help="Also write Great Expectations' own Data Docs to gx/ (their styling loads "
                                        "from a CDN; validation.html summarises the same results offline)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the verdict line"),
) -> None:
    """Gate a quantized GGUF: structural gates, expectation suites, then quality metrics vs the baseline.
    Exit 0 passed, 1 a gate failed, 2 unusable inputs. The last line printed is the verdict."""
    from quantgate.inputs import resolve_model
    from quantgate.pipeline import validate_artifact as run
    from validation.gate import UnusableInput, check_inputs, exit_code
    from validation.publish import gate_line, summary_line
    from validation.thresholds import default_gates, load_gates

    if gates_file is not None:
        gate_set = load_gates(gates_file)
        if threshold is not None:
            from validation.thresholds import GateSet

            gate_set = GateSet(gate_set.name, gate_set.gates + default_gates(threshold, metric).gates)
    elif threshold is not None:
        gate_set = default_gates(threshold, metric)
    else:
        fail("give --threshold T (with --metric M) or --gates FILE")
        return
    base, cand = resolve_model(baseline).path, resolve_model(quantized).path
    try:
        check_inputs(base, cand)  # before run(): no error record, audit event or report beside /dev/null or a FIFO
    except UnusableInput as e:
        fail(str(e))
        return
    try:
        verdict = run(base, cand, gate_set, report_dir=report_dir, junit=junit, dataset=dataset,
                      calibration=calibration, backend=backend, max_tokens=max_tokens, batch_size=batch_size,
                      manifest=manifest, expect_sha256=expect_sha256, suites_dirs=suites,
                      expectations=not no_expectations, data_docs=data_docs, progress=_progress(quiet))
    except UnusableInput as e:
        fail(f"{e} (record: {e.error_path})")
        return
    if not quiet:
        for g in verdict.gates:
            if not g.passed or g.kind == "metric":
                console.print(lit(gate_line(g), 2000), highlight=False, soft_wrap=True)
        console.print(f"reports: {lit(Path(verdict.report_paths['validation_json']).parent)}", highlight=False)
    console.print(lit(summary_line(verdict), 2000), highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code(verdict))


@app.command()
@handle_errors
def diff(
    a: Path = typer.Argument(..., help="First (older) quantized GGUF (any part of a split GGUF: the whole set)"),
    b: Path = typer.Argument(..., help="Second (newer) quantized GGUF (any part of a split GGUF: the whole set)"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Baseline model: adds per-tensor error and "
                                                                        "model-metric deltas (baseline logits cached)"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Eval JSONL (default: data/eval.jsonl)"),
    gates_file: Optional[Path] = typer.Option(None, "--gates", help="Gate set YAML whose metrics are compared"),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir",
                                              help="Reports go to DIR/diff-<a12>-<b12>/ (default: <b>.reports/)"),
    fail_on_regression: Optional[float] = typer.Option(None, "--fail-on-regression", metavar="TOL",
                                                       help="Exit 1 when B is worse than A by more than TOL on a "
                                                            "gated metric"),
    backend: str = typer.Option("torch", "--backend", help="Candidate runner: torch | llama.cpp"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per sample, BOS included"),
) -> None:
    """Compare two quantized GGUFs (a split GGUF, named by any of its parts, as one model): metadata, tensor types
    and sizes, per-tensor error and model metrics vs the baseline, gate verdicts. Exit 1 on a regression beyond
    --fail-on-regression, 2 on unusable inputs (a missing part of a split GGUF included)."""
    from validation.diff import diff as run_diff
    from validation.diff import write_diff_reports
    from validation.thresholds import load_gates

    gate_set = load_gates(gates_file) if gates_file is not None else None
    rep = run_diff(a, b, baseline=baseline, dataset=dataset, gates=gate_set, backend=backend,
                   max_tokens=max_tokens, tolerance=fail_on_regression)
    folder = write_diff_reports(rep, report_dir)
    console.print(lit(rep.summary, 4000), highlight=False, soft_wrap=True)
    console.print(f"reports: {lit(folder)}", highlight=False)
    regressions = rep.regressions if fail_on_regression is not None else []
    console.print(lit(rep.verdict_line(fail_on_regression), 2000), highlight=False, soft_wrap=True)
    raise typer.Exit(1 if regressions else 0)
