"""Metric gates: parse a gate set (YAML file, params.yaml, or `--threshold/--metric`) and judge an EvalReport.

A gate is `[category:]metric comparator threshold`, e.g. `accuracy_drop <= 0.005` or `code:kl_mean < 0.05`.
`category` is one of the dataset's categories, `*` (every category the report has, one gate each) or absent
(the overall metrics). Metrics are the fields of validation.metrics.Metrics (docs/METRICS.md).
"""
from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from core.errors import QuantGateError
from core.hashing import canonical_json, sha256_text
from core.records import GateResult
from core.safe_yaml import YAMLLimitError, load_yaml_file
from validation.metrics import Metrics

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
}
#: Metrics a gate may name (every numeric field of Metrics).
METRICS: tuple[str, ...] = tuple(f.name for f in fields(Metrics))
DEFAULT_METRIC = "accuracy_drop"
EACH_CATEGORY = "*"
_GATE_RE = re.compile(r"^\s*(?:(?P<cat>[\w*.-]+)\s*:\s*)?(?P<metric>\w+)\s*(?P<op><=|>=|==|<|>)\s*(?P<thr>\S+)\s*$")


class GateSpecError(QuantGateError, ValueError):
    """A gate set that cannot be used: unknown metric or comparator, bad threshold, bad YAML."""


@dataclass(frozen=True)
class GateSpec:
    """One metric gate: `metric comparator threshold`, on the overall metrics or on one category (or each: '*')."""

    metric: str
    comparator: str
    threshold: float
    category: str | None = None

    @property
    def name(self) -> str:
        where = f"{self.category}:" if self.category else ""
        return f"{where}{self.metric}{self.comparator}{self.threshold:g}"

    def worse(self, old: float, new: float) -> float:
        """How much worse `new` is than `old` for this gate's direction (positive = regression)."""
        return (old - new) if self.comparator in (">=", ">") else (new - old)


@dataclass(frozen=True)
class GateSet:
    """A named, ordered list of metric gates; its identity is the SHA-256 of its canonical JSON."""

    name: str
    gates: tuple[GateSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gates": [asdict(g) for g in self.gates]}

    def sha256(self) -> str:
        """Content identity: the same gates in the same order give the same digest, whatever the file's layout."""
        return sha256_text(canonical_json([asdict(g) for g in self.gates]))

    @property
    def label(self) -> str:
        """What Verdict.gate_set records: `name@sha256[:12]`."""
        return f"{self.name}@{self.sha256()[:12]}"


def parse_gate(text: str) -> GateSpec:
    """Parse `[category:]metric <op> threshold` (e.g. `code:kl_mean < 0.05`) into a GateSpec."""
    m = _GATE_RE.match(str(text))
    if not m:
        raise GateSpecError(f"cannot parse gate {text!r}: expected '[category:]metric <=|<|>=|>|== number'")
    return make_gate(m["metric"], m["op"], m["thr"], m["cat"])


def make_gate(metric: str, comparator: str, threshold: Any, category: str | None = None) -> GateSpec:
    """A checked GateSpec: known metric and comparator, finite numeric threshold."""
    if metric not in METRICS:
        raise GateSpecError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if comparator not in COMPARATORS:
        raise GateSpecError(f"unknown comparator {comparator!r}; valid: {', '.join(COMPARATORS)}")
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise GateSpecError(f"gate {metric}: threshold {threshold!r} is not a number") from None
    if not math.isfinite(thr):
        raise GateSpecError(f"gate {metric}: threshold must be finite, got {threshold!r}")
    return GateSpec(metric, comparator, thr, str(category) if category not in (None, "") else None)


def _gate_from_item(item: Any) -> GateSpec:
    if isinstance(item, str):
        return parse_gate(item)
    if not isinstance(item, dict) or "metric" not in item:
        raise GateSpecError(f"a gate must be a string like 'kl_mean <= 0.05' or a mapping with 'metric': {item!r}")
    ops = [op for op in ("max", "min", "op", "comparator") if op in item]
    if "max" in item or "min" in item:
        if len(ops) != 1:
            raise GateSpecError(f"gate {item['metric']}: give exactly one of max, min or op+threshold")
        return make_gate(item["metric"], "<=" if "max" in item else ">=", item.get("max", item.get("min")),
                         item.get("category"))
    op = item.get("op", item.get("comparator"))
    if op is None or "threshold" not in item:
        raise GateSpecError(f"gate {item['metric']}: needs max, min, or op and threshold")
    return make_gate(item["metric"], op, item["threshold"], item.get("category"))


def gates_from_config(cfg: Any, name: str = "gates") -> GateSet:
    """A GateSet from parsed YAML: a list of gates, `{gates: [...]}`, `{validate: {gates: [...]}}` (params.yaml),
    plus an optional `per_category: {code: [gates...]}` mapping beside `gates`."""
    if isinstance(cfg, dict) and isinstance(cfg.get("validate"), dict) and "gates" in cfg["validate"]:
        cfg = cfg["validate"]
    per_cat: dict[str, Any] = {}
    if isinstance(cfg, dict):
        if "gates" not in cfg and "per_category" not in cfg:
            raise GateSpecError("no 'gates' (or 'validate: gates:') key in the gate configuration")
        name = str(cfg.get("name") or name)
        per_cat = cfg.get("per_category") or {}
        cfg = cfg.get("gates") or []
    if not isinstance(cfg, list) or not isinstance(per_cat, dict):
        raise GateSpecError("'gates' must be a list and 'per_category' a mapping of category -> list of gates")
    specs = [_gate_from_item(item) for item in cfg]
    for cat, items in per_cat.items():
        for item in items or []:
            g = _gate_from_item(item)
            specs.append(GateSpec(g.metric, g.comparator, g.threshold, str(cat)))
    if not specs:
        raise GateSpecError("the gate configuration lists no gates")
    return GateSet(name, tuple(specs))


def load_gates(path: "str | os.PathLike[str]") -> GateSet:
    """Read a gate set from a YAML file (gates.yaml, or params.yaml with a `validate.gates` key)."""
    p = Path(path)
    try:
        cfg = load_yaml_file(p, "gate file")  # no anchors/aliases, size-capped, regular files only
    except FileNotFoundError:
        raise GateSpecError(f"gate file not found: {p}") from None
    except YAMLLimitError as e:
        raise GateSpecError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise GateSpecError(f"cannot read gate file {p}: {getattr(e, 'strerror', None) or e}") from None
    return gates_from_config(cfg, name=p.stem)


def default_gates(threshold: float, metric: str = DEFAULT_METRIC) -> GateSet:
    """The gate set of `quantgate validate --threshold T [--metric M]`: one overall gate `M <= T`."""
    g = make_gate(metric, "<=", threshold)
    return GateSet(f"threshold-{metric}", (g,))


def _metric_value(m: Metrics, metric: str) -> float | None:
    v = getattr(m, metric)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def expand(gates: GateSet, categories: list[str]) -> list[GateSpec]:
    """Gates with `*` replaced by one gate per category present in the report."""
    out: list[GateSpec] = []
    for g in gates.gates:
        if g.category == EACH_CATEGORY:
            out += [GateSpec(g.metric, g.comparator, g.threshold, c) for c in categories]
        else:
            out.append(g)
    return out


def judge(spec: GateSpec, metrics: Metrics | None) -> GateResult:
    """One gate against one Metrics record; an undefined value (no tokens, zero baseline accuracy) fails."""
    res = GateResult(name=spec.name, kind="metric", metric=spec.metric, comparator=spec.comparator,
                     threshold=spec.threshold, category=spec.category)
    if metrics is None:
        res.detail = f"the dataset has no category {spec.category!r}"
        return res
    v = _metric_value(metrics, spec.metric)
    res.value = v
    if v is None:
        res.detail = f"{spec.metric} is undefined on this data (no scored tokens or zero baseline accuracy)"
        return res
    res.passed = COMPARATORS[spec.comparator](v, spec.threshold)
    res.detail = f"{spec.metric} = {v:.6g} {'meets' if res.passed else 'breaks'} {spec.comparator} {spec.threshold:g}"
    return res


def evaluate_gates(gates: GateSet, report: Any) -> list[GateResult]:
    """Judge every gate of `gates` against an EvalReport's overall / per-category metrics, in gate order."""
    cats = sorted(report.per_category)
    return [judge(g, report.overall if g.category is None else report.per_category.get(g.category))
            for g in expand(gates, cats)]


__all__ = ["GateSpec", "GateSet", "GateSpecError", "COMPARATORS", "METRICS", "DEFAULT_METRIC", "parse_gate",
           "make_gate", "gates_from_config", "load_gates", "default_gates", "expand", "judge", "evaluate_gates"]
