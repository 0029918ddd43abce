"""Great Expectations suites over quantgate's tables: the per-tensor error table and the dataset table.

Suites are versioned JSON files (validation/suites/*.json, plus any a user puts in a `--suites` folder), each in GX's
own suite layout ({name, expectations: [{type, kwargs, meta}], meta}) with `meta.quantgate = {suite_version, table,
index_column}`; `table` says which table it checks ("tensors" or "dataset"). Values that depend on the model or the
run ({"$PARAMETER": "model_tensor_names"}, ...) are GX suite parameters filled in at run time.

GX is imported only inside run_suites (it costs seconds and hundreds of MB), runs in an ephemeral context with
analytics and progress bars off, and builds its Data Docs into a chosen folder (the HTML loads CSS from CDNs, so
offline it renders unstyled).
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from core.errors import QuantGateError
from core.records import GateResult
from quant.formats import QTYPES
from runtime.datasets import normalize_text

SUITES_DIR = Path(__file__).resolve().parent / "suites"
TABLES = ("tensors", "dataset")
_LAYER = re.compile(r"^blk\.(\d+)\.")


class SuiteError(QuantGateError, ValueError):
    """A suite file that cannot be used (bad JSON, unknown table, missing fields)."""


@dataclass(frozen=True)
class SuiteFile:
    """One expectation suite read from JSON: its name, version, table, index column and raw GX dict."""

    path: Path
    name: str
    version: int
    table: str
    index_column: str | None
    data: dict[str, Any]


def load_suite(path: "str | os.PathLike[str]") -> SuiteFile:
    """Read and check one suite JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SuiteError(f"cannot read suite {p}: {e}") from None
    qg = (data.get("meta") or {}).get("quantgate") if isinstance(data, dict) else None
    if not isinstance(qg, dict) or qg.get("table") not in TABLES:
        raise SuiteError(f"suite {p}: meta.quantgate.table must be one of {', '.join(TABLES)}")
    if not isinstance(data.get("name"), str) or not isinstance(data.get("expectations"), list):
        raise SuiteError(f"suite {p}: needs a string 'name' and a list 'expectations'")
    for i, e in enumerate(data["expectations"]):
        if not isinstance(e, dict) or not isinstance(e.get("type"), str) or not isinstance(e.get("kwargs", {}), dict):
            raise SuiteError(f"suite {p}: expectation {i} needs a 'type' string and a 'kwargs' mapping")
    return SuiteFile(p, data["name"], int(qg.get("suite_version", 1)), qg["table"], qg.get("index_column"), data)


def find_suites(extra_dirs: Iterable["str | os.PathLike[str]"] = ()) -> list[SuiteFile]:
    """The bundled suites, then every *.json in each extra folder (sorted by file name)."""
    out = []
    for d in (SUITES_DIR, *map(Path, extra_dirs)):
        if not d.is_dir():
            raise SuiteError(f"suite folder not found: {d}")
        out += [load_suite(p) for p in sorted(d.glob("*.json"))]
    names = [s.name for s in out]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise SuiteError(f"several suites are named {', '.join(dups)}")
    return out


def tensor_table(per_tensor: Iterable[Any]) -> "Any":
    """The per-tensor metrics table (pandas DataFrame): one row per TensorError, plus layer and the type's bpw."""
    import pandas as pd


    rows = []
    for t in per_tensor:
        d = t.to_dict() if hasattr(t, "to_dict") else dict(t)
        q = QTYPES.get(d["qtype"])
        expected = q.bits_per_weight if q is not None else None
        bpw = d.get("bits_per_weight")
        m = _LAYER.match(d["name"])
        rows.append({
            "name": d["name"], "qtype": d["qtype"], "layer": int(m.group(1)) if m else -1,
            "n_elements": d["n_elements"], "bits_per_weight": bpw, "bpw_expected": expected,
            "bpw_delta": abs(bpw - expected) if bpw is not None and expected is not None and bpw == bpw else None,
            "mse": d["mse"], "rel_rmse": d["rel_rmse"], "cosine": d["cosine"], "max_abs_error": d["max_abs_error"],
        })
    return pd.DataFrame(rows, columns=["name", "qtype", "layer", "n_elements", "bits_per_weight", "bpw_expected",
                                       "bpw_delta", "mse", "rel_rmse", "cosine", "max_abs_error"])


def dataset_table(eval_ds: Any, calibration_ds: Any | None = None) -> "Any":
    """The dataset table (pandas DataFrame): every eval sample (split=eval) and calibration sample, with its length,
    normalized text, its category's share of its split, and whether its text is in both splits."""
    import pandas as pd


    rows = []
    for split, ds in (("eval", eval_ds), ("calibration", calibration_ds)):
        if ds is None:
            continue
        counts = ds.categories()
        for s in ds.samples:
            rows.append({"id": s.id, "category": s.category, "text": s.text, "source": s.source, "split": split,
                         "n_chars": len(s.text), "text_norm": normalize_text(s.text),
                         "category_share": counts[s.category] / len(ds.samples)})
    df = pd.DataFrame(rows, columns=["id", "category", "text", "source", "split", "n_chars", "text_norm",
                                     "category_share"])
    splits = df.groupby("text_norm")["split"].nunique()
    df["in_both_splits"] = df["text_norm"].map(splits).fillna(0).astype(int) > 1
    return df


def _quiet_gx() -> Any:
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    logging.getLogger("great_expectations").setLevel(logging.CRITICAL)  # Data Docs renderer noise
    import great_expectations as gx

    return gx


def _gate_name(suite: SuiteFile, cfg: dict[str, Any]) -> str:
    meta_id = (cfg.get("meta") or {}).get("id")
    if meta_id:
        return f"expectation:{suite.name}:{meta_id}"
    kw = cfg.get("kwargs") or {}
    col = kw.get("column") or ",".join(kw.get("column_list") or []) or "table"
    return f"expectation:{suite.name}:{cfg['type']}:{col}"


def _short(v: Any, n: int = 160) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n - 3] + "..."


def _detail(r: Any, index_column: str | None, parameters: dict[str, Any]) -> tuple[str, float | None]:
    res = r.result or {}
    if r.exception_info and r.exception_info.get("raised_exception"):
        return f"expectation raised: {r.exception_info.get('exception_message')}", None
    ov = res.get("observed_value")
    if "missing_count" in res and "distinct_values" in r.expectation_config.type:  # set expectations (GX 1.24): values missing from / unexpected in the set
        missing, extra = res.get("partial_missing_list") or [], res.get("partial_unexpected_list") or []
        n = (res.get("missing_count") or 0) + (res.get("unexpected_count") or 0)
        return f"missing {_short(missing)}; unexpected {_short(extra)}", float(n)
    want = r.expectation_config.kwargs.get("value_set")
    if isinstance(want, dict) and "$PARAMETER" in want:
        want = parameters.get(want["$PARAMETER"])
    if hasattr(ov, "__iter__") and not isinstance(ov, (str, dict)) and hasattr(want, "__iter__") \
            and not isinstance(want, (str, dict)):
        missing, extra = sorted(set(want) - set(ov)), sorted(set(ov) - set(want))
        return f"missing {_short(missing)}; unexpected {_short(extra)}", float(len(missing) + len(extra))
    if res.get("unexpected_count") is not None:
        n = res["unexpected_count"]
        if not n:
            return f"all {res.get('element_count', '?')} values meet it", 0.0
        idx = res.get("partial_unexpected_index_list") or []
        if idx and index_column and isinstance(idx[0], dict):
            shown = [f"{i.get(index_column)}" for i in idx[:5]]
        else:
            shown = [_short(v, 40) for v in (res.get("partial_unexpected_list") or [])[:5]]
        return f"{n} unexpected of {res.get('element_count', '?')}: {', '.join(shown)}", float(n)
    if "observed_value" in res:
        value = float(ov) if isinstance(ov, (int, float)) and not isinstance(ov, bool) else None
        return f"observed {_short(ov)}", value
    return "", None


def run_suites(tables: dict[str, Any], suites: list[SuiteFile], parameters: dict[str, Any], *,
               docs_dir: "str | os.PathLike[str] | None" = None) -> list[GateResult]:
    """Validate each table with the suites that target it (suites whose table is absent are skipped); one
    GateResult (kind "expectation") per expectation. Data Docs go to `docs_dir` when given (a relative one is
    resolved against the working directory: GX accepts only absolute folders)."""
    todo = [s for s in suites if s.table in tables]
    if not todo:
        return []
    gx = _quiet_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    actions = []
    if docs_dir is not None:
        site = {"class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}}
        ctx.add_data_docs_site(site_name="quantgate", site_config=site)
        actions = [UpdateDataDocsAction(name="data_docs", site_names=["quantgate"])]
    source = ctx.data_sources.add_pandas("quantgate")
    out: list[GateResult] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # GX 1.9+ deprecates string row conditions
        for i, suite in enumerate(todo):
            batch = source.add_dataframe_asset(f"{suite.table}-{i}").add_batch_definition_whole_dataframe("all")
            gx_suite = ExpectationSuite(name=suite.name, meta={k: v for k, v in suite.data.get("meta", {}).items()})
            for e in suite.data["expectations"]:
                gx_suite.add_expectation_configuration(
                    ExpectationConfiguration(type=e["type"], kwargs=e.get("kwargs", {}), meta=e.get("meta")))
            gx_suite = ctx.suites.add(gx_suite)
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{suite.name}-{i}", data=batch,
                                                                        suite=gx_suite))
            fmt: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": 5}
            if suite.index_column:
                fmt["unexpected_index_column_names"] = [suite.index_column]
            cp = ctx.checkpoints.add(gx.Checkpoint(name=f"cp-{i}", validation_definitions=[vd], actions=actions,
                                                   result_format=fmt))
            run = cp.run(batch_parameters={"dataframe": tables[suite.table]}, expectation_parameters=parameters)
            for vr in run.run_results.values():
                for r in vr.results:
                    cfg = r.expectation_config
                    name = _gate_name(suite, {"type": cfg.type, "kwargs": cfg.kwargs, "meta": cfg.meta})
                    detail, value = _detail(r, suite.index_column, parameters)
                    out.append(GateResult(name=name, kind="expectation", metric=cfg.type, value=value,
                                          passed=bool(r.success), detail=detail,
                                          category=suite.table))
    return out


__all__ = ["SUITES_DIR", "TABLES", "SuiteError", "SuiteFile", "load_suite", "find_suites", "tensor_table",
           "dataset_table", "run_suites"]
