"""`quantgate convert`: HF checkpoint -> float GGUF, as llama.cpp's convert_hf_to_gguf.py writes it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from core.text import one_line
from quantgate.cli_app import app, console, err_console, handle_errors, lit, model_repo_option, model_rev_option


@app.command()
@handle_errors
def convert(
    model: str = typer.Option(..., "--model", "-m", help="HF checkpoint: folder, .safetensors or .bin/.pt, a Hub id "
                                                         "in the local HF cache (org/name), models:/NAME/VERSION or "
                                                         "models:/NAME@ALIAS, or a path in --model-repo"),
    model_repo: Optional[str] = model_repo_option(),
    model_rev: Optional[str] = model_rev_option(),
    out: Path = typer.Option(..., "--out", "-o", help="Output .gguf path (written atomically)"),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16 or bf16 (1-D tensors and norms stay F32)"),
    generic: bool = typer.Option(False, "--generic", help="Unknown architecture: keep the original tensor names"),
    tokenizer_pre: Optional[str] = typer.Option(
        None, "--tokenizer-pre", help="BPE pre-tokenizer name for llama.cpp when the tokenizer is not recognized"),
    threads: int = typer.Option(0, "--threads", "-t", help="Kernel threads (0: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="Print the artifact record as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Convert an HF checkpoint to an F32/F16/BF16 GGUF with its tokenizer (what convert_hf_to_gguf.py writes)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from quantgate.convert import convert_model
    from quantgate.inputs import resolve_model
    from quantgate.pipeline import artifact_json

    src = resolve_model(model, repo=model_repo, rev=model_rev)
    show = not quiet and not as_json
    with Progress(
        TextColumn("[bold]convert[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}", markup=False), console=err_console, disable=not show, transient=True,
    ) as progress:
        task = progress.add_task("", total=None)

        def on_tensor(i: int, n: int, name: str) -> None:
            progress.update(task, total=n, completed=i, description=one_line(name, 120))

        art = convert_model(src.path, out, outtype, generic, tokenizer_pre=tokenizer_pre, threads=threads or None,
                            on_tensor=on_tensor, source_lineage=src.lineage_json())
    if as_json:
        print(artifact_json(art))
    elif show:
        console.print(f"wrote [bold]{lit(art.path)}[/] {art.nbytes / 2**20:.2f} MiB ({outtype.upper()}), "
                      f"{art.seconds:.1f}s, sha256 {art.sha256}")
