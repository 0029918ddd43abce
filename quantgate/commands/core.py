"""Core commands: quantize, inspect, verify, sample, version."""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Optional

import typer

from core.errors import QuantGateError
from core.text import one_line
from quantgate.cli_app import (
    app,
    cell,
    console,
    err_console,
    handle_errors,
    lit,
    model_repo_option,
    model_rev_option,
)


def _parse_overrides(values: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        if "=" not in v or not v.split("=", 1)[0] or not v.split("=", 1)[1]:
            raise QuantGateError(f"--tensor-type expects REGEX=TYPE, got {v!r}")
        pat, typ = v.rsplit("=", 1)
        out.append((pat, typ.upper()))
    return tuple(out)


@app.command()
@handle_errors
def quantize(
    model: str = typer.Option(..., "--model", "-m",
                              help="Checkpoint: HF folder, .safetensors, .bin/.pt, .gguf, a Hub id in the local HF "
                                   "cache (org/name), models:/NAME/VERSION or models:/NAME@ALIAS, or a path in "
                                   "--model-repo"),
    model_repo: Optional[str] = model_repo_option(),
    model_rev: Optional[str] = model_rev_option(),
    precision: str = typer.Option(..., "--precision", "-p", help="F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S Q3_K_L Q3_K_M Q3_K_S Q2_K Q2_K_S, IQ4_XS IQ4_NL IQ3_M IQ3_S IQ3_XS IQ3_XXS IQ2_M IQ2_S IQ2_XS IQ2_XXS IQ1_M IQ1_S TQ2_0 TQ1_0 MXFP4_MOE (Q4_0 Q4_1 Q5_0 Q5_1); case-insensitive"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .gguf path (written atomically)"),
    pure: bool = typer.Option(False, "--pure", help="Quantize every tensor to the default type (no k-quant mixture)"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix GGUF or legacy .dat)"),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="ggml type for output.weight"),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="ggml type for token_embd.weight"),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE override (repeatable)"),
    threads: int = typer.Option(0, "--threads", "-t", help="Kernel threads (0: all cores)"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Allow already-quantized GGUF input"),
    generic: bool = typer.Option(False, "--generic", help="Unknown architecture: keep names, quantize 2-D weights"),
    as_json: bool = typer.Option(False, "--json", help="Print the artifact record as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor types, total size and bpw the run "
                                                          "would write (with --json: as JSON); write nothing"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="auto: sensitivity profile JSON (quantgate profile)"),
    policy: Optional[str] = typer.Option(None, "--policy", help="auto: threshold or budget (default: the profile's choices)"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="auto: budget in bits per weight"),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="auto: budget as file size, e.g. 3.9GB"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="auto without --profile: calibration set"),
    overrides: Optional[Path] = typer.Option(None, "--overrides", help="auto: YAML regex -> type, applied on top"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="auto: calibration cache folder"),
    profile_out: Optional[Path] = typer.Option(None, "--profile-out", help="auto: write the profile with the choices"),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Write a split GGUF (llama-gguf-split layout: OUT-00001-of-0000N.gguf, ...) with at most this much tensor data per part, e.g. 2G, 500M"),
    split_max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", help="Write a split GGUF with at most N tensors per part"),
) -> None:
    """Quantize a checkpoint to a GGUF v3 file with a llama.cpp mix (same types and bytes as llama-quantize), or
    with `--precision auto` per-tensor types chosen by the precision analyzer (docs/ANALYZER.md)."""
    import dataclasses

    from core.records import QuantizeRequest
    from quant.gguf_split import split_options
    from quantgate.inputs import resolve_model

    split = {"split_max_bytes": None, "split_max_tensors": None, **split_options(split_max_size, split_max_tensors)}
    src = resolve_model(model, repo=model_repo, rev=model_rev)
    lineage = src.lineage_json()
    if precision.strip().upper() == "AUTO":
        from analyzer.auto import auto_request

        if pure or tensor_type or output_tensor_type or token_embedding_type or allow_requantize or generic:
            raise QuantGateError("--precision auto chooses every tensor's type: use --overrides (YAML regex -> type) "
                                 "instead of --pure/--tensor-type/--output-tensor-type/--token-embedding-type; "
                                 "--allow-requantize and --generic are not supported with it")
        from analyzer.policy import load_overrides

        if dry_run and profile_out is not None:
            raise QuantGateError("--dry-run writes nothing: drop --profile-out")

        def profile_progress(i: int, n: int, name: str) -> None:  # as `quantgate profile` prints it, on stderr
            if not quiet:
                err_console.print(f"[dim]profile {i}/{n} {lit(one_line(name, 120))}[/]", highlight=False)

        with auto_request(src.path, out, profile=profile, calib=calib, policy=policy, target_bpw=target_bpw,
                          target_size=target_size, overrides=load_overrides(str(overrides)) if overrides else (),
                          imatrix=imatrix, cache_dir=cache_dir, profile_out=profile_out,
                          threads=threads or None, progress=profile_progress) as (req, _plan):
            _run_quantize(dataclasses.replace(req, source_lineage=lineage, **split), as_json, quiet, dry_run)
        return
    if any(v is not None for v in (profile, policy, target_bpw, target_size, overrides, profile_out)):
        raise QuantGateError("--profile/--policy/--target-bpw/--target-size/--overrides/--profile-out need "
                             "--precision auto")
    req = QuantizeRequest(
        source=src.path,
        source_lineage=lineage,
        out=out,
        precision=precision,
        pure=pure,
        imatrix=imatrix,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        tensor_type_overrides=_parse_overrides(tensor_type),
        threads=threads or None,
        allow_requantize=allow_requantize,
        generic=generic,
        **split,
    )
    _run_quantize(req, as_json, quiet, dry_run)


def _print_plan(req, as_json: bool) -> None:
    """`quantize --dry-run`: the plan (quantgate.pipeline.plan_quantize) as a table and a total line, or JSON."""
    from rich.table import Table

    from quantgate.pipeline import plan_quantize

    plan = plan_quantize(req)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
        return
    t = Table("tensor", "type", "shape", "bytes", "bpw")
    for r in plan.tensors:
        n = 1
        for d in r["shape"]:
            n *= int(d)
        t.add_row(cell(r["name"]), cell(r["type"]), cell("x".join(str(d) for d in r["shape"])), str(r["bytes"]),
                  f"{8.0 * r['bytes'] / max(n, 1):.3f}")
    console.print(t)
    console.print(f"{lit(plan.precision)} ({lit(plan.file_type_name)}): {len(plan.tensors)} tensors, "
                  f"{plan.tensor_bytes} bytes of tensor data ({plan.tensor_bytes / 2**20:.2f} MiB), "
                  f"{plan.n_params} weights, {plan.bits_per_weight:.4f} bpw; dry run, nothing written",
                  highlight=False)


def _run_quantize(req, as_json: bool, quiet: bool, dry_run: bool = False) -> None:
    """Run one pipeline request with a progress bar; print the record (--json) or a one-line summary; --dry-run:
    print the plan instead."""
    if dry_run:
        _print_plan(req, as_json)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from quantgate.pipeline import artifact_json, quantize_model

    show = not quiet and not as_json
    with Progress(
        TextColumn("[bold]quantize[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}", markup=False), console=err_console, disable=not show, transient=True,
    ) as progress:
        task = progress.add_task("", total=None)

        def on_tensor(i: int, n: int, name: str) -> None:
            progress.update(task, total=n, completed=i, description=one_line(name, 120))

        art = quantize_model(req, on_tensor=on_tensor)
    if as_json:
        print(artifact_json(art))
        return
    if show:
        parts = f" (+ {len(art.parts) - 1} more part(s) of a split GGUF)" if len(art.parts) > 1 else ""
        console.print(
            f"wrote [bold]{lit(art.path)}[/]{parts} {art.nbytes / 2**20:.2f} MiB, {art.bits_per_weight:.3f} bpw, "
            f"{art.seconds:.1f}s, sha256 {art.sha256}"
        )


@app.command()
@handle_errors
def inspect(
    file: Path = typer.Argument(..., help="GGUF file"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Show a GGUF file's metadata and tensor table (type, shape, bytes, bits/weight, totals)."""
    from quant.inspect import inspect_gguf

    report = inspect_gguf(file)
    if as_json:
        print(report.to_json())
    else:
        _literal_report(report).render(console)


def _literal_report(report):
    """The inspect report with every name and string value on one line, control characters escaped (the report
    itself escapes rich markup)."""
    import dataclasses

    big = 100_000  # the report cuts long values itself
    report.path = one_line(report.path, big)
    report.tensors = [dataclasses.replace(t, name=one_line(t.name, big)) for t in report.tensors]
    report.metadata_types = {one_line(k, big): v for k, v in report.metadata_types.items()}
    report.metadata = {one_line(k, big): one_line(v, big) if isinstance(v, str) else v
                       for k, v in report.metadata.items()}
    return report


@app.command()
@handle_errors
def verify(
    file: Path = typer.Argument(..., help="GGUF file"),
    no_values: bool = typer.Option(False, "--no-values", help="Skip the NaN/Inf scan of dequantized tensors"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output"),
) -> None:
    """Check a GGUF file against the spec and ggml's reader rules; exit 0 valid, 1 invalid (every problem listed)."""
    from quant.verify import verify_gguf

    if not file.exists():  # unusable input (exit 2), not an invalid GGUF (exit 1)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(file))
    if file.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(file))
    if not file.is_file():  # a device, FIFO or socket: bad input, not an invalid GGUF
        raise QuantGateError(f"{file}: not a regular file (a device, FIFO or socket); verify reads GGUF files")
    rep = verify_gguf(file, check_values=not no_values)
    if as_json:
        print(json.dumps(rep.to_dict() if hasattr(rep, "to_dict") else rep.__dict__, indent=2, default=str))
    else:
        for p in rep.problems:
            err_console.print(f"[red]problem:[/] {lit(p)}", highlight=False, soft_wrap=True)
        verdict = "valid" if rep.ok else f"INVALID ({len(rep.problems)} problems)"
        console.print(f"{lit(file)}: {verdict}, {rep.n_tensors} tensors, {rep.file_size} bytes", highlight=False)
    raise typer.Exit(0 if rep.ok else 1)


@app.command()
@handle_errors
def sample(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the HF checkpoint into"),
    layers: int = typer.Option(2, help="Number of layers"),
    embd: int = typer.Option(256, help="Hidden size"),
    ff: int = typer.Option(768, help="FFN size"),
    vocab: int = typer.Option(1024, help="Vocabulary size"),
    seed: int = typer.Option(0, help="Random seed"),
    shape: Optional[str] = typer.Option(
        None, help="A named shape instead of --layers/--embd/--ff/--vocab: 1b (TinyLlama's, 2.2 GB) or 8b "
                   "(Llama-3-8B's, 16 GB); written tensor by tensor, never the whole model in memory"),
) -> None:
    """Write a deterministic llama-shaped sample checkpoint (HF safetensors, F16) to try the pipeline on."""
    from quantgate.sample import SHAPES, SampleShape, make_sample_checkpoint

    if shape is None:
        dims = SampleShape(n_layer=layers, n_embd=embd, n_ff=ff, n_vocab=vocab)
    elif shape.lower() in SHAPES:
        dims = SHAPES[shape.lower()]
    else:
        raise QuantGateError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    path = make_sample_checkpoint(out, dims, seed=seed)
    console.print(f"wrote sample checkpoint to {lit(path)}", highlight=False)


@app.command()
def version() -> None:
    """Print quantgate's version."""
    from core.version import __version__

    print(__version__)
