"""Type-choice policies: threshold semantics, exact budgeted knapsack (respects and is monotone in the budget),
overrides and size parsing."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer.policy import (
    BudgetPolicy,
    Item,
    Option,
    PolicyError,
    ThresholdPolicy,
    choose_budget,
    choose_threshold,
    load_overrides,
    override_choices,
    parse_size,
)

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")


def _item(name: str, sizes: list[int], errors: list[float]) -> Item:
    return Item(name, tuple(Option(t, s, e) for t, s, e in zip(TYPES[:len(sizes)], sizes, errors, strict=True)))


@st.composite
def items(draw, max_items: int = 4):
    out = []
    for i in range(draw(st.integers(1, max_items))):
        k = draw(st.integers(1, 4))
        sizes = sorted(draw(st.lists(st.integers(1, 400), min_size=k, max_size=k, unique=True)))
        errs = sorted(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k)), reverse=True)
        out.append(_item(f"t{i}", sizes, errs))
    return out


def _total(its, choice, what="size_bytes"):
    return sum(getattr(it.option(choice[it.name].qtype), what) for it in its)


@settings(max_examples=150, deadline=None)
@given(its=items(), frac=st.floats(0, 1))
def test_budget_is_respected_and_optimal(its, frac):
    lo = sum(min(o.size_bytes for o in it.options) for it in its)
    hi = sum(max(o.size_bytes for o in it.options) for it in its)
    budget = int(lo + frac * (hi - lo))
    choice = choose_budget(its, BudgetPolicy(budget, max_units=10**6))  # granule 1: the exact optimum
    assert _total(its, choice) <= budget
    best = min(sum(o.error for o in combo) for combo in itertools.product(*(it.options for it in its))
               if sum(o.size_bytes for o in combo) <= budget)
    assert _total(its, choice, "error") == pytest.approx(best, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(its=items(6), budgets=st.lists(st.integers(0, 3000), min_size=2, max_size=6))
def test_budget_is_monotone_and_within_budget_with_a_coarse_granule(its, budgets):
    lo = sum(min(o.size_bytes for o in it.options) for it in its)
    prev = None
    for b in sorted(lo + x for x in budgets):
        try:
            choice = choose_budget(its, BudgetPolicy(b, max_units=50))  # sizes rounded up to a coarse granule
        except PolicyError:
            assert prev is None  # only the smallest budgets may be infeasible after rounding up
            continue
        assert _total(its, choice) <= b
        err = _total(its, choice, "error")
        if prev is not None:
            assert err <= prev + 1e-9
        prev = err


def test_budget_below_the_smallest_file_is_refused():
    its = [_item("a", [10, 20], [1.0, 0.5])]
    with pytest.raises(PolicyError, match="below the smallest"):
        choose_budget(its, BudgetPolicy(9))


def test_threshold_takes_the_smallest_type_within_its_threshold():
    its = [_item("a", [1, 2, 3, 4, 5, 6, 7], [0.5, 0.2, 0.05, 0.01, 0.002, 1e-4, 0.0]),
           _item("b", [1, 2, 3, 4, 5, 6, 7], [0.5, 0.2, 0.2, 0.2, 0.2, 0.1, 0.0])]
    pol = ThresholdPolicy(q2_threshold=None, q3_threshold=0.1, q4_threshold=0.1, q5_threshold=0.1,
                          q6_threshold=0.1, q8_threshold=0.05, max_f16=0)
    ch = choose_threshold(its, pol)
    assert ch["a"].qtype == "Q4_K" and "q4_threshold" in ch["a"].reason  # Q3_K's 0.2 > 0.1; Q4_K's 0.05 fits
    assert ch["b"].qtype == "Q8_0" and "max_f16" in ch["b"].reason  # nothing fits; no F16 allowed
    ch = choose_threshold(its, ThresholdPolicy(q3_threshold=0.1, q4_threshold=0.1, q5_threshold=0.1,
                                               q6_threshold=0.1, q8_threshold=0.05, max_f16=1))
    assert ch["b"].qtype == "F16"
    assert choose_threshold(its, ThresholdPolicy(q2_threshold=0.6))["b"].qtype == "Q2_K"


@settings(max_examples=80, deadline=None)
@given(its=items(5), t1=st.floats(0, 10), t2=st.floats(0, 10), f16=st.integers(0, 3))
def test_looser_thresholds_never_choose_larger_types(its, t1, t2, f16):
    lo, hi = sorted((t1, t2))
    tight = ThresholdPolicy(lo, lo, lo, lo, lo, lo, max_f16=f16)
    loose = ThresholdPolicy(hi, hi, hi, hi, hi, hi, max_f16=f16)
    a, b = choose_threshold(its, tight), choose_threshold(its, loose)
    for it in its:
        assert it.option(b[it.name].qtype).size_bytes <= it.option(a[it.name].qtype).size_bytes
    assert sum(c.qtype == "F16" for c in a.values()) <= max(f16, sum(
        len(it.options) == 1 and it.options[0].qtype == "F16" for it in its))


def test_overrides_first_match_wins_and_respect_row_length(tmp_path):
    p = tmp_path / "o.yaml"
    p.write_text("overrides:\n  - {pattern: 'ffn_down', type: q6_k}\n  - {pattern: 'blk\\.0\\.', type: Q8_0}\n")
    ov = load_overrides(str(p))
    got = override_choices({"blk.0.ffn_down.weight": (256, 256), "blk.0.attn_q.weight": (256, 256),
                            "blk.1.attn_q.weight": (256, 256)}, ov)
    assert {k: c.qtype for k, c in got.items()} == {"blk.0.ffn_down.weight": "Q6_K", "blk.0.attn_q.weight": "Q8_0"}
    with pytest.raises(PolicyError, match="not a multiple"):
        override_choices({"x.weight": (8, 96)}, [("x", "Q4_K")])
    (tmp_path / "m.yaml").write_text("'output\\.weight': F16\n")
    assert load_overrides(str(tmp_path / "m.yaml")) == [("output\\.weight", "F16")]


def test_parse_size():
    assert parse_size("3.9GB") == 3_900_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(PolicyError):
        parse_size("3.9 parsecs")
