"""Gate specs: parsing (strings, mappings, YAML, params.yaml), per-category and '*' gates, judging EvalReports."""
from __future__ import annotations

import math

import pytest

from validation.metrics import Metrics
from validation.thresholds import (
    GateSpecError,
    default_gates,
    evaluate_gates,
    gates_from_config,
    load_gates,
    parse_gate,
)


def _m(kl: float, acc_drop: float | None = 0.001, top1: float = 0.99) -> Metrics:
    return Metrics(2, 10, 5.0, 5.1, 1.02, math.log(1.02), kl, kl, kl * 3, kl * 5, top1, 0.5, 0.49, acc_drop, 0.0, 0.0)


class _Report:
    def __init__(self) -> None:
        self.overall = _m(0.01)
        self.per_category = {"code": _m(0.02), "chat": _m(0.005), "math": _m(0.03, acc_drop=None)}


def test_parse_forms():
    g = parse_gate("code: kl_mean < 0.05")
    assert (g.category, g.metric, g.comparator, g.threshold) == ("code", "kl_mean", "<", 0.05)
    assert parse_gate("accuracy_drop<=0.005").name == "accuracy_drop<=0.005"
    for bad in ("kl_mean", "nope <= 1", "kl_mean =< 1", "kl_mean <= abc", "kl_mean <= inf"):
        with pytest.raises(GateSpecError):
            parse_gate(bad)


def test_yaml_and_params_yaml(tmp_path):
    (tmp_path / "gates.yaml").write_text(
        "name: ci\ngates:\n  - accuracy_drop <= 0.005\n  - {metric: top1_agreement, min: 0.9}\n"
        "  - {metric: kl_mean, op: '<', threshold: 0.1, category: '*'}\n"
        "per_category:\n  code: ['kl_mean <= 0.05']\n")
    gs = load_gates(tmp_path / "gates.yaml")
    assert gs.name == "ci" and [g.name for g in gs.gates] == [
        "accuracy_drop<=0.005", "top1_agreement>=0.9", "*:kl_mean<0.1", "code:kl_mean<=0.05"]
    (tmp_path / "params.yaml").write_text("quantize: {precision: Q4_K_M}\nvalidate:\n  gates: ['kl_mean <= 0.1']\n")
    assert [g.name for g in load_gates(tmp_path / "params.yaml").gates] == ["kl_mean<=0.1"]
    # the same gates in another layout have the same identity
    assert gates_from_config(["kl_mean<=0.1"]).sha256() == load_gates(tmp_path / "params.yaml").sha256()
    for bad in ({"other": 1}, {"gates": []}, {"gates": [{"metric": "kl_mean"}]},
                {"gates": [{"metric": "kl_mean", "max": 1, "min": 0}]}):
        with pytest.raises(GateSpecError):
            gates_from_config(bad)
    with pytest.raises(GateSpecError, match="not found"):
        load_gates(tmp_path / "missing.yaml")


def test_evaluate_gates_overall_categories_and_undefined():
    gs = gates_from_config({"gates": ["kl_mean <= 0.015", "*:kl_mean <= 0.025", "math:accuracy_drop <= 0.01",
                                      "nocat:kl_mean <= 1"]})
    res = {r.name: r for r in evaluate_gates(gs, _Report())}
    assert res["kl_mean<=0.015"].passed and res["kl_mean<=0.015"].value == 0.01
    assert res["code:kl_mean<=0.025"].passed and res["chat:kl_mean<=0.025"].passed
    assert not res["math:kl_mean<=0.025"].passed and res["math:kl_mean<=0.025"].value == 0.03
    assert not res["math:accuracy_drop<=0.01"].passed and "undefined" in res["math:accuracy_drop<=0.01"].detail
    assert not res["nocat:kl_mean<=1"].passed and "no category" in res["nocat:kl_mean<=1"].detail
    assert all(r.kind == "metric" for r in res.values())


def test_default_gates_boundary():
    gs = default_gates(0.01, "kl_mean")
    assert evaluate_gates(gs, _Report())[0].passed          # 0.01 <= 0.01
    assert not evaluate_gates(default_gates(0.0099, "kl_mean"), _Report())[0].passed
    assert default_gates(0.005).gates[0].metric == "accuracy_drop"
