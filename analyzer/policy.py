"""Per-tensor type choice from a sensitivity profile: threshold mode and budget mode, plus regex overrides.

Both modes only ever pick among a tensor's *candidates*: the analyzer's types (Q2_K ... Q8_0, F16) whose block
size divides the tensor's row length (llama.cpp would otherwise fall back to another type), and only for tensors
llama.cpp allows to be quantized (1-D tensors, norms etc. keep their float type and are counted as fixed bytes).

* threshold mode: a tensor takes the smallest candidate T whose estimated relative error est(T) is at most T's
  threshold (a type without a threshold is skipped). A tensor meeting no threshold goes to F16 if it is among the
  `max_f16` tensors with the largest est(Q8_0), else to its largest non-F16 candidate.
* budget mode: minimize the sum of predicted errors subject to sum of sizes <= budget, an exact multiple-choice
  knapsack solved by dynamic programming over sizes rounded *up* to a granule. The granule depends only on the
  tensors (sum of their largest candidate sizes / max_units), never on the budget, so the optimum is exact for the
  rounded sizes, always within the real budget, and monotone: a larger budget never gives a larger predicted error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from core.errors import QuantGateError, UnsupportedTypeError
from quant.formats import get_qtype

#: Candidate types, smallest first.
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16")
DEFAULT_MAX_UNITS = 100_000
_THRESHOLD_FIELDS = {"Q2_K": "q2_threshold", "Q3_K": "q3_threshold", "Q4_K": "q4_threshold",
                     "Q5_K": "q5_threshold", "Q6_K": "q6_threshold", "Q8_0": "q8_threshold"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class PolicyError(QuantGateError):
    """The policy cannot be satisfied (budget below the smallest possible file) or is misconfigured."""


@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor: its size in bytes and its error (estimate or prediction)."""

    qtype: str
    size_bytes: int
    error: float


@dataclass(frozen=True)
class Item:
    """A quantizable tensor with its candidate options (any order)."""

    name: str
    options: tuple[Option, ...]

    def option(self, qtype: str) -> Option | None:
        return next((o for o in self.options if o.qtype == qtype), None)


@dataclass(frozen=True)
class Choice:
    """The type chosen for a tensor and why."""

    qtype: str
    reason: str


@dataclass(frozen=True)
class ThresholdPolicy:
    """Threshold mode: per-type limits on the estimated relative error (None disables a type). Defaults are
    documented in docs/ANALYZER.md: roughly 'keep a tensor's weighted relative error under ~1%'."""

    q2_threshold: float | None = None
    q3_threshold: float | None = 0.01
    q4_threshold: float | None = 0.01
    q5_threshold: float | None = 0.01
    q6_threshold: float | None = 0.01
    q8_threshold: float | None = 0.01
    max_f16: int = 0

    def threshold(self, qtype: str) -> float | None:
        f = _THRESHOLD_FIELDS.get(qtype)
        return getattr(self, f) if f else None

    def to_dict(self) -> dict:
        return {"mode": "threshold", **{f: getattr(self, f) for f in _THRESHOLD_FIELDS.values()},
                "max_f16": self.max_f16}


@dataclass(frozen=True)
class BudgetPolicy:
    """Budget mode: the quantizable tensors' bytes may not exceed `budget_bytes`; `target` says what the user
    asked for (e.g. "bpw=4.85" or "size=3.9GB")."""

    budget_bytes: int
    target: str = ""
    max_units: int = DEFAULT_MAX_UNITS

    def to_dict(self) -> dict:
        return {"mode": "budget", "budget_bytes": int(self.budget_bytes), "target": self.target,
                "max_units": self.max_units}


def _by_size(item: Item) -> list[Option]:
    return sorted(item.options, key=lambda o: (o.size_bytes, CANDIDATE_TYPES.index(o.qtype)
                                               if o.qtype in CANDIDATE_TYPES else 99))


def choose_threshold(items: Sequence[Item], policy: ThresholdPolicy) -> dict[str, Choice]:
    """Threshold mode (module docstring); `Option.error` must be the estimated relative error."""
    out: dict[str, Choice] = {}
    failing: list[Item] = []
    for it in items:
        if not it.options:
            raise PolicyError(f"tensor {it.name} has no candidate type")
        for o in _by_size(it):
            th = policy.threshold(o.qtype)
            if th is not None and o.error <= th:
                out[it.name] = Choice(o.qtype, f"threshold: est {o.qtype} {o.error:.3g} <= "
                                               f"{_THRESHOLD_FIELDS[o.qtype]} {th:g}")
                break
        else:
            failing.append(it)

    def q8_err(it: Item) -> float:
        o = it.option("Q8_0")
        return o.error if o is not None else math.inf

    ranked = sorted(failing, key=lambda it: (-q8_err(it), it.name))
    n_f16 = 0
    for it in ranked:
        f16 = it.option("F16")
        if f16 is not None and n_f16 < policy.max_f16:
            n_f16 += 1
            out[it.name] = Choice("F16", f"no threshold met; F16 (worst at Q8_0, {n_f16} of max_f16={policy.max_f16})")
            continue
        non_f16 = [o for o in _by_size(it) if o.qtype != "F16"]
        o = non_f16[-1] if non_f16 else _by_size(it)[-1]
        why = "max_f16 reached" if f16 is not None else "F16 not a candidate"
        out[it.name] = Choice(o.qtype, f"no threshold met; {why}: largest quantized candidate")
    return {it.name: out[it.name] for it in items}


def choose_budget(items: Sequence[Item], policy: BudgetPolicy) -> dict[str, Choice]:
    """Budget mode (module docstring): exact multiple-choice knapsack by DP over granule-rounded sizes."""
    if not items:
        return {}
    if any(not it.options for it in items):
        raise PolicyError("every tensor needs at least one candidate type")
    total_max = sum(max(o.size_bytes for o in it.options) for it in items)
    granule = max(1, math.ceil(total_max / max(1, policy.max_units)))
    cap = int(policy.budget_bytes) // granule
    min_units = sum(min(-(-o.size_bytes // granule) for o in it.options) for it in items)
    if cap < min_units:
        smallest = sum(min(o.size_bytes for o in it.options) for it in items)
        raise PolicyError(f"budget {policy.budget_bytes} bytes is below the smallest possible size of the "
                          f"quantizable tensors ({smallest} bytes, every tensor at its smallest candidate)")
    inf = np.inf
    dp = np.zeros(cap + 1, dtype=np.float64)  # dp[c]: least error of the items so far within c units
    picks = np.empty((len(items), cap + 1), dtype=np.int16)
    for i, it in enumerate(items):
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for k, o in enumerate(it.options):
            u = -(-o.size_bytes // granule)
            if u > cap:
                continue
            cand = dp[:cap + 1 - u] + float(o.error)
            better = cand < new[u:]
            new[u:][better] = cand[better]
            pick[u:][better] = k
        dp = new
        picks[i] = pick
    c = cap
    out: dict[str, Choice] = {}
    for i in range(len(items) - 1, -1, -1):
        k = int(picks[i, c])
        assert k >= 0, "knapsack backtrack hit an infeasible state"
        o = items[i].options[k]
        out[items[i].name] = Choice(o.qtype, f"budget: minimum total predicted error within {policy.budget_bytes} "
                                             f"bytes (this tensor {o.size_bytes} B, predicted error {o.error:.3g})")
        c -= -(-o.size_bytes // granule)
    return {it.name: out[it.name] for it in items}


def compile_overrides(overrides: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern[str], str]]:
    """Validate (regex, type) pairs: the regex compiles and the type is a ggml type."""
    out = []
    for pat, typ in overrides:
        try:
            out.append((re.compile(pat), get_qtype(typ).name))
        except re.error as e:
            raise UnsupportedTypeError(f"invalid override pattern {pat!r}: {e}") from None
    return out


def load_overrides(path: "str") -> list[tuple[str, str]]:
    """Read an overrides YAML: a mapping `regex: TYPE`, or `overrides:` holding that mapping or a list of
    {pattern, type} items; order is kept (the first matching regex wins)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise PolicyError(f"{path}: cannot read overrides: {e}") from None
    if isinstance(data, dict) and "overrides" in data:
        data = data["overrides"]
    pairs: list[tuple[str, str]] = []
    if isinstance(data, dict):
        pairs = [(str(k), str(v)) for k, v in data.items()]
    elif isinstance(data, list):
        for i, d in enumerate(data):
            if not isinstance(d, dict) or "pattern" not in d or "type" not in d:
                raise PolicyError(f"{path}: override {i} must have 'pattern' and 'type'")
            pairs.append((str(d["pattern"]), str(d["type"])))
    elif data is not None:
        raise PolicyError(f"{path}: overrides must be a mapping regex -> type or a list")
    compile_overrides(pairs)
    return pairs


def override_choices(names_shapes: Mapping[str, tuple[int, ...]], overrides: Sequence[tuple[str, str]]
                     ) -> dict[str, Choice]:
    """Tensors an override pins (first matching regex wins); the type's block must divide the row."""
    out = {}
    for name, shape in names_shapes.items():
        for pat, typ in compile_overrides(overrides):
            if pat.search(name):
                cols = int(shape[-1])
                if cols % get_qtype(typ).block_size:
                    raise PolicyError(f"override {pat.pattern!r} -> {typ}: {name} has rows of {cols}, "
                                      f"not a multiple of {typ}'s block of {get_qtype(typ).block_size}")
                out[name] = Choice(typ, f"override {pat.pattern!r} -> {typ}")
                break
    return out


def parse_size(text: str) -> int:
    """'3.9GB' -> 3_900_000_000 bytes (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary, bare number = bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise PolicyError(f"cannot read size {text!r} (examples: 3.9GB, 500MiB, 123456)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


@dataclass
class BudgetPlan:
    """How a target turns into the byte budget of the quantizable tensors."""

    target: str
    total_bytes: int        # what the target allows for the whole file (size) or all tensor data (bpw)
    fixed_bytes: int        # tensors the policy does not choose (1-D, norms, overrides)
    overhead_bytes: int     # GGUF header, metadata and alignment padding (size targets only)
    budget_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.budget_bytes = self.total_bytes - self.fixed_bytes - self.overhead_bytes


def budget_for_bpw(bpw: float, n_params: int, fixed_bytes: int) -> BudgetPlan:
    """Budget so the file's bits per weight (8 * all tensor bytes / all parameters, as the artifact reports it)
    is at most `bpw`."""
    if bpw <= 0:
        raise PolicyError(f"--target-bpw must be positive, got {bpw}")
    return BudgetPlan(f"bpw={bpw:g}", int(math.floor(bpw * n_params / 8)), fixed_bytes, 0)


def budget_for_size(size_bytes: int, fixed_bytes: int, overhead_bytes: int, target: str = "") -> BudgetPlan:
    """Budget so the whole file (tensor data + header + padding) is at most `size_bytes`."""
    return BudgetPlan(target or f"size={size_bytes}", int(size_bytes), fixed_bytes, overhead_bytes)
