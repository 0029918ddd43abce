"""Layer-streamed sensitivity measurement: each (tensor, type)'s effect on its own block's output, and per-block
gains (calibrated by a few whole-model KLD measurements, streamed too) that map block-output error to final KLD.

One sweep over the blocks (runtime.layer_stream: one block's float32 weights in memory), with the clean
calibration activations H_i at block i's input (measurement batch: `n_seqs x seq_len` tokens):

* every quantizable tensor t of block i, every missing candidate type T: t alone replaced by Q_T(W) (quantize then
  dequantize with our ggml-exact kernels and the imatrix, as the file will hold it), block i run on H_i;
  `block_err(t, T) = sum ||Y' - Y||^2 / sum ||Y - H_i||^2`, the relative change of the block's residual update;
* calibration: the block's tensor groups (attention, feed-forward) quantized together at CALIBRATION_TYPE; the
  perturbed block output is carried through every later block (clean weights) and the head: the whole-model KLD
  of that perturbation over its block_err is the group's gain `G(i, group)`;
* token_embd: the embedding rows the tokens select, relative change; its gain from the same calibration (a stream
  from the input); output.weight: the head alone quantized, KLD measured exactly (no gain needed).

predicted(t, T) = G(block(t), group(t)) * block_err(t, T): the additive per-tensor KLD the budget policy sums
(docs/ANALYZER.md, "Streamed measurement"). The exact reference (a whole-model pass per (tensor, type)) stays in
analyzer.profile (measure mode "exact").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from core.errors import QuantGateError
from core.progress import ProgressFn
from quant.imatrix import Imatrix
from runtime.layer_stream import LayerStream

#: The type the per-block gains are calibrated at (falls back to Q8_0 for rows its 256-block does not divide).
CALIBRATION_TYPE = "Q3_K"
#: Perturbed streams run through a block together, this many at a time (bounds the block's intermediate tensors).
_STREAMS_PER_CALL = 4
_ROWS = 4096  # rows per step of the float64 error sums


@dataclass
class TensorRow:
    """One (tensor, type): the imatrix-weighted relative weight error, and what the sweep measured."""

    est_error: float
    block_err: float | None = None
    measured_kld: float | None = None
    measured_mse: float | None = None


@dataclass
class SweepResult:
    """Rows per GGUF tensor name and type, and each tensor's gain (block error -> KLD)."""

    rows: dict[str, dict[str, TensorRow]] = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)
    gain_detail: dict[str, dict[str, float]] = field(default_factory=dict)


def rel_weight_error(x: np.ndarray, xq: np.ndarray, w: np.ndarray | None) -> float:
    """sum_ij w_j (x - xq)^2 / sum_ij w_j x^2 in float64, a few thousand rows at a time (bounded memory)."""
    ww = (w if w is not None else np.ones(x.shape[1], np.float32)).astype(np.float64)
    num = den = 0.0
    for s in range(0, x.shape[0], _ROWS):
        a = x[s:s + _ROWS].astype(np.float64)
        d = a - xq[s:s + _ROWS]
        num += float(((d * d) @ ww).sum())
        den += float(((a * a) @ ww).sum())
        del a, d
    return num / den if den > 0 else 0.0


def _group_of(param_name: str) -> str:
    """The tensor group a block parameter (name relative to the block) is calibrated with."""
    return "attn" if param_name.startswith("self_attn.") or ".self_attn." in param_name else "ffn"


class _KLD:
    """Mean per-token KL(base || other) and mean squared logit difference, from final hidden states (128 tokens a
    step, log-softmax in float64)."""

    def __init__(self, torch, norm, head_w, h_final) -> None:
        self.torch, self.norm, self.head_w = torch, norm, head_w
        self.x = norm(h_final).reshape(-1, h_final.shape[-1])
        self.base = [torch.nn.functional.linear(self.x[s:s + 128], head_w) for s in range(0, self.x.shape[0], 128)]

    def of_hidden(self, h, head_w=None) -> tuple[float, float]:
        return self.of_normed(self.norm(h).reshape(-1, h.shape[-1]), head_w)

    def of_normed(self, x, head_w=None) -> tuple[float, float]:
        torch = self.torch
        w = self.head_w if head_w is None else head_w
        kl = mse = 0.0
        for k, s in enumerate(range(0, x.shape[0], 128)):
            lg = torch.nn.functional.linear(x[s:s + 128], w)
            lb = torch.log_softmax(self.base[k].double(), dim=-1)
            lq = torch.log_softmax(lg.double(), dim=-1)
            kl += float((lb.exp() * (lb - lq)).sum())
            mse += float(((lg - self.base[k]).double() ** 2).sum())
        n = x.shape[0]
        return max(kl / n, 0.0), mse / (n * w.shape[0])


def streamed_sweep(model_path, chunks: list[list[int]], todo: dict[str, list[str]], *, imatrix: Imatrix | None,
                   quant_dequant: Callable[[np.ndarray, str, np.ndarray | None], np.ndarray],
                   gguf_names: Callable[[Iterable[str], int], dict[str, str]], allowed: Callable[[str, str], bool],
                   progress: ProgressFn | None = None) -> SweepResult:
    """Measure the (tensor, type) pairs of `todo` (GGUF name -> types) and every tensor's gain in one sweep.
    `gguf_names(hf_names, n_layer)` maps HF weight names to GGUF names; `allowed(name, type)` says whether a type's
    block divides the tensor's rows (for the calibration type)."""
    import torch

    res = SweepResult()
    ids = torch.tensor(chunks, dtype=torch.long)
    with LayerStream(model_path) as ls, torch.inference_mode():
        names = gguf_names(ls.weights.names, ls.n_layer)
        n_done, n_total = 0, len(todo)

        def tick(name: str) -> None:
            nonlocal n_done
            n_done += 1
            if progress is not None:
                progress(n_done, n_total, name)

        def cal_type(name: str) -> str:
            return CALIBRATION_TYPE if allowed(name, CALIBRATION_TYPE) else "Q8_0"

        def imat(name: str) -> np.ndarray | None:
            return imatrix.values(name) if imatrix is not None else None

        # ---- input: token_embd rows -------------------------------------------------------------------------
        streams: list[dict[str, Any]] = []   # perturbed hidden states riding along the sweep
        emb_name = names.get(ls.arch.embed)
        e = ls.tensor(ls.arch.embed)
        h = torch.nn.functional.embedding(ids, e)
        if emb_name is not None:
            x = e.numpy()
            for qt in todo.get(emb_name, []):
                xq = quant_dequant(x, qt, imat(emb_name))
                row = TensorRow(rel_weight_error(x, xq, imat(emb_name)))
                hq = torch.nn.functional.embedding(ids, torch.from_numpy(xq))
                row.block_err = _rel(torch, hq - h, h)
                res.rows.setdefault(emb_name, {})[qt] = row
                del xq, hq
            ct = cal_type(emb_name)
            xq = torch.from_numpy(quant_dequant(x, ct, imat(emb_name)))
            hq = torch.nn.functional.embedding(ids, xq)
            streams.append({"key": emb_name, "tensors": [emb_name], "h": hq, "err": _rel(torch, hq - h, h),
                            "head": xq if ls.tied else None})
            if emb_name in todo:
                tick(emb_name)
            del xq
        del e
        ctx = ls.context(h)

        # ---- blocks ---------------------------------------------------------------------------------------------
        for i in range(ls.n_layer):
            with ls.block(i) as layer:
                y = ls.run_block(layer, i, h, ctx)
                upd = y - h
                params = dict(layer.named_parameters())
                prefix = ls.arch.layer_prefix.format(i=i)
                cal: dict[str, dict[str, np.ndarray]] = {}
                for pname, p in params.items():
                    g = names.get(prefix + pname)
                    if g is None or p.ndim != 2:
                        continue
                    x = p.data.numpy().copy()
                    orig = p.data
                    for qt in todo.get(g, []):
                        xq = quant_dequant(x, qt, imat(g))
                        row = TensorRow(rel_weight_error(x, xq, imat(g)))
                        if row.est_error > 0:
                            p.data = torch.from_numpy(xq)
                            row.block_err = _rel(torch, ls.run_block(layer, i, h, ctx) - y, upd)
                            p.data = orig
                        else:
                            row.block_err = 0.0
                        res.rows.setdefault(g, {})[qt] = row
                        del xq
                    cal.setdefault(_group_of(pname), {})[pname] = quant_dequant(x, cal_type(g), imat(g))
                    if g in todo:
                        tick(g)
                    del x
                # perturbed streams started earlier run through this block with its clean weights
                _advance(ls, layer, i, streams, ctx)
                # this block's calibration perturbations start their streams here
                for grp, repl in cal.items():
                    old = {n: params[n].data for n in repl}
                    for n, v in repl.items():
                        params[n].data = torch.from_numpy(v)
                    yq = ls.run_block(layer, i, h, ctx)
                    for n, v in old.items():
                        params[n].data = v
                    tnames = [names[prefix + n] for n in repl]
                    streams.append({"key": f"blk.{i}.{grp}", "tensors": tnames, "h": yq, "err": _rel(torch, yq - y, upd)})
                del cal
            h = y

        # ---- head: output.weight exactly, then each stream's whole-model KLD -> gains ---------------------------
        with ls.head() as (norm, w):
            kld = _KLD(torch, norm, w, h)
            out_name = names.get(ls.arch.head) if not ls.tied else None
            if out_name is not None:
                x = w.numpy()
                for qt in todo.get(out_name, []):
                    xq = quant_dequant(x, qt, imat(out_name))
                    row = TensorRow(rel_weight_error(x, xq, imat(out_name)))
                    row.measured_kld, row.measured_mse = kld.of_normed(kld.x, torch.from_numpy(xq))
                    res.rows.setdefault(out_name, {})[qt] = row
                    del xq
                if out_name in todo:
                    tick(out_name)
            for s in streams:
                k, _ = kld.of_hidden(s["h"], s.get("head"))
                gain = k / s["err"] if s["err"] > 0 else 0.0
                res.gain_detail[s["key"]] = {"kld": k, "block_err": s["err"], "gain": gain}
                for name in s["tensors"]:
                    res.gains[name] = gain
    missing = [n for n in todo if n not in res.rows]
    if missing:
        raise QuantGateError(f"tensors {', '.join(missing[:5])} were not found in the model's blocks")
    return res


def _rel(torch, d, ref) -> float:
    den = float((ref.double() ** 2).sum())
    return float((d.double() ** 2).sum()) / den if den > 0 else 0.0


def _advance(ls: LayerStream, layer, i: int, streams: list[dict[str, Any]], ctx) -> None:
    """Run every perturbed stream through block i (a few streams per call, stacked on the batch axis)."""
    import torch

    for s in range(0, len(streams), _STREAMS_PER_CALL):
        part = streams[s:s + _STREAMS_PER_CALL]
        b = part[0]["h"].shape[0]
        stacked = torch.cat([p["h"] for p in part], dim=0)
        c = ctx if len(part) == 1 else ls.context(stacked)
        out = ls.run_block(layer, i, stacked, c)
        for k, p in enumerate(part):
            p["h"] = out[k * b:(k + 1) * b].clone()
        del stacked, out
