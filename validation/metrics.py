"""Quality metrics of a candidate model against a baseline, accumulated token by token with bounded memory.

Definitions follow llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp); see
docs/METRICS.md for each formula and where quantgate differs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

#: Log-probabilities are stored (cache) and compared at this precision; see docs/METRICS.md.
LOGPROB_DTYPE = np.float16


#: Two-sided 95% normal quantile: kl_mean_upper95 = kl_mean + Z95 * kl_mean_se.
Z95 = 1.96


def sem(mean: float, mean_of_squares: float, n: int) -> float:
    """llama-perplexity's uncertainty of a mean over n tokens: sqrt((E[x^2] - E[x]^2) / (n - 1)); NaN for n < 2."""
    if n < 2:
        return math.nan
    return math.sqrt(max(mean_of_squares - mean * mean, 0.0) / (n - 1))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (n, vocab) logits, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def storage_log_probs(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of (n, vocab) logits rounded to the storage precision (float16), as cached and compared."""
    return log_softmax(logits).astype(LOGPROB_DTYPE)


def renormalize(log_probs: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of stored (float16) rows, renormalized so each row's probabilities sum to 1."""
    return log_softmax(np.asarray(log_probs, dtype=np.float64))


def kl_per_token(lp_base: np.ndarray, lp_cand: np.ndarray) -> np.ndarray:
    """KL(base || cand) per row: sum_v p_base(v) * (log p_base(v) - log p_cand(v)), in nats (0*log0 = 0)."""
    lb = np.asarray(lp_base, dtype=np.float64)
    lc = np.asarray(lp_cand, dtype=np.float64)
    pb = np.exp(lb)
    with np.errstate(invalid="ignore"):
        terms = np.where(pb > 0, pb * (lb - lc), 0.0)
    return terms.sum(axis=-1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at index fraction*(n-1) of the ascending values."""
    v = np.asarray(sorted_values)
    if v.size == 0:
        return math.nan
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


def median(sorted_values: np.ndarray) -> float:
    """llama.cpp's median: the middle value, or the mean of the two middle values for an even count."""
    v = np.asarray(sorted_values)
    if v.size == 0:
        return math.nan
    h = v.size // 2
    return float(v[h]) if v.size % 2 else float(0.5 * (v[h] + v[h - 1]))


@dataclass
class Metrics:
    """Aggregate quality metrics over a set of scored tokens (see docs/METRICS.md for exact definitions)."""

    n_samples: int
    n_tokens: int
    ppl_baseline: float
    ppl_candidate: float
    ppl_ratio: float
    ln_ppl_ratio: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    acc_baseline: float
    acc_candidate: float
    accuracy_drop: float | None
    delta_p_mean: float
    delta_p_rms: float
    # Standard errors of the mean, as llama-perplexity prints them after "±" (docs/EVALUATION.md): NaN when unknown
    # (fewer than 2 tokens, or a record written before they existed).
    ppl_baseline_se: float = math.nan
    ppl_candidate_se: float = math.nan
    ln_ppl_ratio_se: float = math.nan
    ppl_ratio_se: float = math.nan
    kl_mean_se: float = math.nan
    kl_mean_upper95: float = math.nan          # kl_mean + 1.96 * kl_mean_se: gate on it to gate with confidence
    top1_agreement_se: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; NaN (no tokens) becomes None so the JSON stays standard."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        """Inverse of to_dict (None back to NaN for float fields)."""
        out = {}
        for f in fields(cls):
            if f.name.endswith(("_se", "_upper95")) and f.name not in d:
                continue        # records written before the uncertainties existed
            v = d[f.name]
            out[f.name] = math.nan if v is None and f.name != "accuracy_drop" else v
        return cls(**out)


class MetricsAccumulator:
    """Running sums over scored tokens plus the per-token KL values (8 bytes a token) for median/p99/max."""

    def __init__(self) -> None:
        self.n_samples = 0
        self.n_tokens = 0
        self.sum_nll_base = 0.0
        self.sum_nll_cand = 0.0
        self.n_same_top = 0
        self.n_correct_base = 0
        self.n_correct_cand = 0
        self.sum_p_diff = 0.0
        self.sum_p_diff2 = 0.0
        self.sum_nll_base2 = 0.0
        self.sum_nll_cand2 = 0.0
        self.sum_d_nll = 0.0     # d = nll_cand - nll_base per token: its spread gives the SE of ln(PPL ratio)
        self.sum_d_nll2 = 0.0
        self._kl: list[np.ndarray] = []

    def add(self, lp_base: np.ndarray, lp_cand: np.ndarray, targets: np.ndarray) -> None:
        """Add one sample: (n, vocab) normalized log-probs of both models at n positions and the n true next tokens."""
        lb = np.asarray(lp_base, dtype=np.float64)
        lc = np.asarray(lp_cand, dtype=np.float64)
        t = np.asarray(targets, dtype=np.int64)
        if lb.shape != lc.shape or lb.ndim != 2 or t.shape != (lb.shape[0],):
            raise ValueError(f"shape mismatch: base {lb.shape}, candidate {lc.shape}, targets {t.shape}")
        rows = np.arange(t.size)
        self.add_tokens(lb[rows, t], lc[rows, t], lb.argmax(axis=-1), lc.argmax(axis=-1), t, kl_per_token(lb, lc))

    def add_tokens(self, lp_target_base: np.ndarray, lp_target_cand: np.ndarray, top_base: np.ndarray,
                   top_cand: np.ndarray, targets: np.ndarray, kl: np.ndarray) -> None:
        """Add one sample from per-token values: each model's log-prob of the true next token, each model's argmax,
        the true next tokens and KL(base || cand) per token (what the baseline cache path computes)."""
        t = np.asarray(targets, dtype=np.int64)
        self.n_samples += 1
        if t.size == 0:
            return
        nll_b = -np.asarray(lp_target_base, dtype=np.float64)
        nll_c = -np.asarray(lp_target_cand, dtype=np.float64)
        top_b, top_c = np.asarray(top_base), np.asarray(top_cand)
        p_diff = np.exp(-nll_c) - np.exp(-nll_b)
        d = nll_c - nll_b
        self.n_tokens += int(t.size)
        self.sum_nll_base += float(nll_b.sum())
        self.sum_nll_cand += float(nll_c.sum())
        self.sum_nll_base2 += float((nll_b * nll_b).sum())
        self.sum_nll_cand2 += float((nll_c * nll_c).sum())
        self.sum_d_nll += float(d.sum())
        self.sum_d_nll2 += float((d * d).sum())
        self.n_same_top += int((top_b == top_c).sum())
        self.n_correct_base += int((top_b == t).sum())
        self.n_correct_cand += int((top_c == t).sum())
        self.sum_p_diff += float(p_diff.sum())
        self.sum_p_diff2 += float((p_diff * p_diff).sum())
        self._kl.append(np.asarray(kl, dtype=np.float64))

    def kl_values(self) -> np.ndarray:
        """Every scored token's KL divergence, in the order added."""
        return np.concatenate(self._kl) if self._kl else np.zeros(0)

    def result(self) -> Metrics:
        """The metrics over everything added so far."""
        n = self.n_tokens
        if n == 0:
            nan = math.nan
            return Metrics(self.n_samples, 0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, None, nan, nan)
        kl = np.sort(self.kl_values())
        mb, mc = self.sum_nll_base / n, self.sum_nll_cand / n
        acc_b, acc_c = self.n_correct_base / n, self.n_correct_cand / n
        kl_mean = float(kl.sum() / n)
        top1 = self.n_same_top / n
        se_b = sem(mb, self.sum_nll_base2 / n, n)
        se_c = sem(mc, self.sum_nll_cand2 / n, n)
        se_d = sem(self.sum_d_nll / n, self.sum_d_nll2 / n, n)
        se_kl = sem(kl_mean, float((kl * kl).sum() / n), n)
        return Metrics(
            n_samples=self.n_samples,
            n_tokens=n,
            ppl_baseline=math.exp(mb),
            ppl_candidate=math.exp(mc),
            ppl_ratio=math.exp(mc - mb),
            ln_ppl_ratio=mc - mb,
            kl_mean=kl_mean,
            kl_median=median(kl),
            kl_p99=percentile(kl, 0.99),
            kl_max=float(kl[-1]),
            top1_agreement=top1,
            acc_baseline=acc_b,
            acc_candidate=acc_c,
            accuracy_drop=(acc_b - acc_c) / acc_b if acc_b > 0 else None,
            delta_p_mean=self.sum_p_diff / n,
            delta_p_rms=math.sqrt(self.sum_p_diff2 / n),
            ppl_baseline_se=math.exp(mb) * se_b,
            ppl_candidate_se=math.exp(mc) * se_c,
            ln_ppl_ratio_se=se_d,
            ppl_ratio_se=math.exp(mc - mb) * se_d,
            kl_mean_se=se_kl,
            kl_mean_upper95=kl_mean + Z95 * se_kl,
            top1_agreement_se=math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else math.nan,
        )
