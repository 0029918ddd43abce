"""Precision analyzer commands: `quantgate imatrix`, `quantgate profile`, `quantgate cache ...` (docs/ANALYZER.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from quantgate.cli_app import app, cell, console, err_console, handle_errors, lit

cache_app = typer.Typer(no_args_is_help=True, help="The calibration cache (SQLite): stats, export, import, prune.")
app.add_typer(cache_app, name="cache")

_CALIB_HELP = "Calibration JSONL/TXT (default: data/calibration.jsonl)"
_CACHE_HELP = "Calibration cache folder (default: $QUANTGATE_CACHE_DIR or ~/.cache/quantgate)"


def _calib(calib: Optional[Path]) -> Path:
    from runtime.datasets import DEFAULT_CALIBRATION

    return calib if calib is not None else DEFAULT_CALIBRATION


def _model_sha(model: Path) -> str:
    from analyzer.profile import model_identity
    from quant.loaders import open_checkpoint

    with open_checkpoint(model, allow_requantize=True) as ckpt:
        return model_identity(ckpt)


@app.command("imatrix")
@handle_errors
def imatrix_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="HF folder or float GGUF"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=_CALIB_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output importance matrix"),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama-imatrix's default) or dat (legacy)"),
    chunk_size: int = typer.Option(512, "--chunk-size", help="Tokens per chunk (llama-imatrix's n_ctx)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Use at most this many chunks"),
    process_output: bool = typer.Option(True, "--process-output/--no-process-output",
                                        help="Also collect output.weight (llama-imatrix --process-output)"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
) -> None:
    """Collect an importance matrix from calibration text (what llama-imatrix computes), in either llama.cpp format."""
    from analyzer.cache import CalibrationCache
    from analyzer.profile import cached_imatrix
    from core.version import __version__
    from quant.imatrix import save_imatrix_gguf, save_imatrix_legacy

    if fmt not in ("gguf", "dat"):
        raise typer.BadParameter("--format must be gguf or dat")
    with CalibrationCache(cache_dir) as cache:
        imat = cached_imatrix(model, _calib(calib), _model_sha(model), chunk_size=chunk_size, n_chunks=chunks,
                              cache=cache, tool_version=__version__, process_output=process_output)
    (save_imatrix_gguf if fmt == "gguf" else save_imatrix_legacy)(imat, out)
    console.print(f"wrote {lit(out)}: {len(imat.entries)} tensors, {imat.chunk_count} chunks of {imat.chunk_size} tokens",
                  highlight=False)


def threshold_options(q2: Optional[float], q3: Optional[float], q4: Optional[float], q5: Optional[float],
                      q6: Optional[float], q8: Optional[float], max_f16: int):
    """ThresholdPolicy from CLI values (None: the default; a negative value disables that type)."""
    from dataclasses import replace

    from analyzer.policy import ThresholdPolicy

    pol = ThresholdPolicy(max_f16=max_f16)
    for field, v in (("q2_threshold", q2), ("q3_threshold", q3), ("q4_threshold", q4), ("q5_threshold", q5),
                     ("q6_threshold", q6), ("q8_threshold", q8)):
        if v is not None:
            pol = replace(pol, **{field: None if v < 0 else v})
    return pol


@app.command("profile")
@handle_errors
def profile_cmd(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="HF folder or float GGUF (or --source)"),
    source: Optional[Path] = typer.Option(None, "--source", help="The DVC prepare stage's source.json: profile its "
                                                                 "model (SHA-256 checked)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=_CALIB_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Profile JSON to write"),
    overrides: Optional[Path] = typer.Option(None, "--overrides", help="YAML: regex -> type, applied on top"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Use this importance matrix (else one is collected)"),
    no_imatrix: bool = typer.Option(False, "--no-imatrix", help="Estimate errors for quantization without imatrix"),
    imatrix_out: Optional[Path] = typer.Option(None, "--imatrix-out", help="Also write the collected imatrix (GGUF)"),
    policy: str = typer.Option("threshold", "--policy", help="threshold or budget"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Budget: bits per weight of the file"),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="Budget: file size, e.g. 3.9GB, 500MiB"),
    q2: Optional[float] = typer.Option(None, "--q2-threshold", help="Max est. error for Q2_K (default off)"),
    q3: Optional[float] = typer.Option(None, "--q3-threshold", help="Max est. error for Q3_K (default 0.01)"),
    q4: Optional[float] = typer.Option(None, "--q4-threshold", help="Max est. error for Q4_K (default 0.01)"),
    q5: Optional[float] = typer.Option(None, "--q5-threshold", help="Max est. error for Q5_K (default 0.01)"),
    q6: Optional[float] = typer.Option(None, "--q6-threshold", help="Max est. error for Q6_K (default 0.01)"),
    q8: Optional[float] = typer.Option(None, "--q8-threshold", help="Max est. error for Q8_0 (default 0.01)"),
    max_f16: int = typer.Option(0, "--max-f16", help="Threshold mode: at most this many tensors at F16"),
    types: str = typer.Option("Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,F16", "--types", help="Candidate types"),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Measure each tensor's output effect"),
    measure_seqs: int = typer.Option(8, "--measure-seqs", help="Calibration sequences for the measurement"),
    measure_len: int = typer.Option(128, "--measure-len", help="Tokens per measurement sequence"),
    measure_mode: str = typer.Option("stream", "--measure-mode",
                                     help="stream: block by block + calibrated gains; exact: one whole-model pass "
                                          "per tensor and type (the slow reference)"),
    chunk_size: int = typer.Option(512, "--chunk-size", help="imatrix tokens per chunk"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="imatrix: at most this many chunks"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table"),
) -> None:
    """Per-tensor sensitivity profile (size and error of every candidate type) and the chosen types (JSON)."""
    from analyzer.auto import make_policy, plan_auto
    from analyzer.cache import CalibrationCache
    from analyzer.policy import load_overrides
    from analyzer.profile import build_profile, cached_imatrix
    from core.version import __version__
    from quant.imatrix import load_imatrix, save_imatrix_gguf
    from quantgate.source_record import model_or_source

    src = model_or_source(model, source)
    model = src.path
    cal = _calib(calib)
    ov = load_overrides(str(overrides)) if overrides is not None else []
    imat = load_imatrix(imatrix) if imatrix is not None else None

    def progress(i: int, n: int, name: str) -> None:
        if not quiet:
            err_console.print(f"[dim]profile {i}/{n} {lit(name)}[/]", highlight=False)

    with CalibrationCache(cache_dir) as cache:
        prof = build_profile(model, cal, imatrix=imat, imatrix_label=str(imatrix or ""), use_imatrix=not no_imatrix,
                             chunk_size=chunk_size, n_chunks=chunks,
                             candidate_types=[t.strip().upper() for t in types.split(",") if t.strip()],
                             measure=measure, measure_seqs=measure_seqs, measure_len=measure_len, cache=cache,
                             progress=progress, measure_mode=measure_mode)
        if imatrix_out is not None and prof.imatrix.get("source") == "collected":
            save_imatrix_gguf(cached_imatrix(model, cal, prof.model["sha256"], chunk_size=chunk_size,
                                             n_chunks=chunks, cache=cache, tool_version=__version__,
                                             matmul_dtype=prof.imatrix.get("matmul", "float32")), imatrix_out)
    pol = make_policy(prof, model, mode=policy, target_bpw=target_bpw, target_size=target_size,
                      threshold=threshold_options(q2, q3, q4, q5, q6, q8, max_f16))
    plan_auto(model, prof, pol, ov)
    if not src.is_local:  # the reference, not this machine's download folder (what DVC tracks is content)
        prof.model["path"] = src.ref
    prof.save(out)
    if not quiet:
        render_profile(prof)
        console.print(f"wrote {lit(out)} ({prof.timings['total_s']:.2f}s, {prof.timings['computed_tensors']} tensors "
                      f"computed, the rest from the cache)", highlight=False)


def render_profile(prof) -> None:
    """Table of the choices: tensor, chosen type, bytes, est. error, measured KLD, reason."""
    from rich.table import Table

    t = Table(title=f"profile: {prof.summary.get('bits_per_weight', 0):.3f} bpw, "
                    f"{prof.summary.get('tensor_bytes', 0)} tensor bytes, closest mix "
                    f"{prof.summary.get('file_type_mix', '?')}")
    for c in ("tensor", "type", "bytes", "est", "KLD", "reason"):
        t.add_column(c, justify="right" if c in ("bytes", "est", "KLD") else "left")
    for tp in prof.tensors:
        if not tp.quantizable:
            continue
        s = tp.candidates.get(tp.chosen)
        t.add_row(cell(tp.name), cell(tp.chosen), str(tp.size_of(tp.chosen)), f"{s.est_error:.2e}" if s else "-",
                  f"{s.measured_kld:.2e}" if s and s.measured_kld is not None else "-", tp.reason)
    console.print(t)
    v = prof.validation
    if v:
        console.print(f"rank correlation est vs measured output MSE over {v['pairs']} (tensor, type) pairs: "
                      f"{v['est_vs_mse_all']:.3f}", highlight=False)


@cache_app.command("stats")
@handle_errors
def cache_stats(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output")) -> None:
    """Entries and bytes in the calibration cache, per kind of measurement."""
    from analyzer.cache import CalibrationCache

    with CalibrationCache(cache_dir) as cache:
        st = cache.stats()
    if as_json:
        print(json.dumps(st.to_dict(), indent=2, sort_keys=True))
        return
    console.print(f"{lit(st.path)}: {st.entries} entries, {st.bytes} bytes, {st.hits} hits, {st.models} models, "
                  f"{st.calibration_sets} calibration sets, tool versions {', '.join(st.tool_versions) or '-'}",
                  highlight=False)
    for kind, d in st.by_kind.items():
        console.print(f"  {lit(kind)}: {d['entries']} entries, {d['bytes']} bytes", highlight=False)


@cache_app.command("export")
@handle_errors
def cache_export(file: Path = typer.Argument(..., help="JSONL file to write"),
                 cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP)) -> None:
    """Write every cache entry to a portable, verifiable JSONL file."""
    from analyzer.cache import CalibrationCache

    with CalibrationCache(cache_dir) as cache:
        n = cache.export(file)
    console.print(f"exported {n} entries to {lit(file)}", highlight=False)


@cache_app.command("import")
@handle_errors
def cache_import(file: Path = typer.Argument(..., help="JSONL file from `quantgate cache export`"),
                 cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP)) -> None:
    """Add the entries of an export file (each verified; existing keys kept); recorded in the audit trail."""
    from quantgate.pipeline import import_cache

    r = import_cache(file, cache_dir)
    console.print(f"imported {r.added} of {r.entries} entries from {lit(file)} ({r.skipped} already present)",
                  highlight=False)


@cache_app.command("prune")
@handle_errors
def cache_prune(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
                older_than_days: Optional[float] = typer.Option(None, "--older-than-days", help="Unused this long"),
                max_size: Optional[str] = typer.Option(None, "--max-size", help="Keep at most this much, e.g. 1GB"),
                all_versions: bool = typer.Option(False, "--keep-other-versions",
                                                  help="Keep entries of other quantgate versions")) -> None:
    """Drop entries that can no longer hit (other tool versions), old ones, and LRU ones beyond --max-size."""
    from analyzer.cache import CalibrationCache
    from analyzer.policy import parse_size
    from core.version import __version__

    with CalibrationCache(cache_dir) as cache:
        n = cache.prune(keep_tool_version=None if all_versions else __version__,
                        older_than_s=older_than_days * 86400 if older_than_days is not None else None,
                        max_bytes=parse_size(max_size) if max_size is not None else None)
    console.print(f"pruned {n} entries", highlight=False)
