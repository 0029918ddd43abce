"""`quantgate evaluate`: score a quantized GGUF against its baseline (perplexity, KL divergence, top-1, accuracy)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from quantgate.cli_app import app, cell, console, err_console, handle_errors, lit


def _fmt(v: object, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def _pm(se: object, spec: str) -> str:
    """" ± SE" (llama-perplexity's uncertainty) when the metric has a finite one."""
    return "" if se is None or (isinstance(se, float) and se != se) else f" ± {format(se, spec)}"


def render_report(report) -> None:
    """Print the report's headline, the metrics table (overall + per category) and the worst tensors."""
    from rich.table import Table

    t = report.timings
    console.print(
        f"[bold]{lit(report.candidate.path)}[/] vs [bold]{lit(report.baseline.path)}[/] on "
        f"{lit(report.dataset_path or 'dataset')}: "
        f"{report.n_samples} samples, {report.n_tokens} scored tokens, backend {lit(report.backend)}"
        + (" (baseline from cache)" if t.baseline_cache_hit else ""), highlight=False)
    sets = [("overall", report.overall)] + list(report.per_category.items())
    table = Table(title="quality vs baseline")
    table.add_column("metric")
    for name, _ in sets:
        table.add_column(cell(name, 60), justify="right")
    for label, field, spec in (
        ("scored tokens", "n_tokens", "d"), ("PPL baseline", "ppl_baseline", ".4f"),
        ("PPL candidate", "ppl_candidate", ".4f"), ("PPL ratio", "ppl_ratio", ".5f"), ("KL mean", "kl_mean", ".6f"),
        ("KL mean upper 95%", "kl_mean_upper95", ".6f"),
        ("KL median", "kl_median", ".6f"), ("KL p99", "kl_p99", ".6f"), ("KL max", "kl_max", ".6f"),
        ("top-1 agreement", "top1_agreement", ".2%"), ("accuracy baseline", "acc_baseline", ".2%"),
        ("accuracy candidate", "acc_candidate", ".2%"), ("accuracy drop", "accuracy_drop", ".2%"),
        ("RMS delta p", "delta_p_rms", ".2%"),
    ):
        table.add_row(label, *(_fmt(getattr(m, field), spec) + _pm(getattr(m, f"{field}_se", None), spec)
                               for _, m in sets))
    console.print(table)
    worst = sorted(report.per_tensor, key=lambda e: -(e.rel_rmse or 0.0))[:8]
    tt = Table(title=f"per-tensor weight error (worst {len(worst)} of {len(report.per_tensor)} by relative RMSE)")
    for col in ("tensor", "type", "bpw", "MSE", "rel RMSE", "cosine", "max |err|"):
        tt.add_column(col, justify="left" if col == "tensor" else "right")
    for e in worst:
        tt.add_row(cell(e.name), cell(e.qtype), _fmt(e.bits_per_weight, ".3f"), _fmt(e.mse, ".3e"), _fmt(e.rel_rmse),
                   _fmt(e.cosine, ".6f"), _fmt(e.max_abs_error, ".3e"))
    console.print(tt)
    console.print(
        f"baseline {_fmt(t.baseline_tokens_per_s, '.0f')} tok/s, candidate {_fmt(t.candidate_tokens_per_s, '.0f')} "
        f"tok/s, total {t.total_seconds:.1f}s", highlight=False)


@app.command()
@handle_errors
def evaluate(
    baseline: str = typer.Option(..., "--baseline", "-b", help="Baseline: HF model folder or F32/F16/BF16 GGUF (or a "
                                                               "Hub id in the HF cache, models:/NAME/VERSION, "
                                                               "models:/NAME@ALIAS)"),
    candidate: str = typer.Option(..., "--candidate", "-c", help="Quantized GGUF to score (or models:/NAME@ALIAS, "
                                                                 "models:/NAME/VERSION)"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Eval JSONL (default: data/eval.jsonl)"),
    backend: str = typer.Option("torch", "--backend", help="Candidate runner: torch | llama.cpp"),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens per sample, BOS included"),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per forward pass"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this path"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table"),
) -> None:
    """Score a quantized GGUF against its baseline: perplexity, KL divergence, top-1 agreement, accuracy, per-tensor
    error (definitions: docs/METRICS.md). Baseline log-probs are cached in $QUANTGATE_CACHE_DIR."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from core.atomic import atomic_write_text
    from quantgate.inputs import resolve_model
    from validation.evaluate import evaluate as run_evaluate

    base, cand = resolve_model(baseline).path, resolve_model(candidate).path
    if dataset is None:
        from runtime.datasets import DEFAULT_EVAL

        dataset = Path(DEFAULT_EVAL)
    with Progress(TextColumn("[bold]evaluate[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, disable=quiet, transient=True) as progress:
        task = progress.add_task("", total=None)
        report = run_evaluate(base, cand, dataset, backend=backend, max_tokens=max_tokens,
                              batch_size=batch_size,
                              progress=lambda done, total, _what: progress.update(task, completed=done, total=total))
    if json_out is not None:
        atomic_write_text(json_out, report.to_json())
    if not quiet:
        render_report(report)
        if json_out is not None:
            console.print(f"wrote {lit(json_out)}", highlight=False)
