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

import os

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from core.errors import QuantGateError
from core.progress import ProgressFn
from quant.imatrix import Imatrix
from analyzer.delta_block import PARAMS, BlockBase, rms_delta, supports_layer
from runtime.layer_stream import LayerStream, model_type_of

#: The type the per-block gains are calibrated at (falls back to Q8_0 for rows its 256-block does not divide).
CALIBRATION_TYPE = "Q3_K"
#: Perturbed streams run through a block together, this many at a time (bounds the block's intermediate tensors:
#: each stream in a call holds ~0.1 GB of float32 temporaries at SHAPE_1B; 1 also gives every stream and every
#: measurement the same matmul shapes, so a stream's numbers never depend on how many others share its call).
_STREAMS_PER_CALL = 1
#: Version of the streamed measurement's numbers: part of every stream-mode cache key (via the measure config), so
#: rows computed by an earlier version never hit. 2: one stream per delta call (was 4), 2026-12-04.
STREAM_VERSION = 2
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


def _matrices(x: np.ndarray, w: np.ndarray | None):
    """(matrix, its imatrix vector) pairs: a 2-D weight itself; a 3-D fused expert tensor (n_expert, rows, cols)
    expert by expert, with that expert's imatrix row (w of n_expert * cols values, as llama-imatrix stores it)."""
    if x.ndim != 3:
        yield x, w
        return
    cols = x.shape[-1]
    per_expert = w is not None and w.size == x.shape[0] * cols
    for e in range(x.shape[0]):
        yield x[e], (w[e * cols:(e + 1) * cols] if per_expert else w)


def weight_energy(x: np.ndarray, w: np.ndarray | None) -> float:
    """sum_ij w_j x_ij^2 in float64 (the denominator of rel_weight_error, the same for every type of a tensor);
    a 3-D expert tensor sums its experts, each weighted by its own imatrix row."""
    den = 0.0
    for xm, wm in _matrices(x, w):
        ww = (wm if wm is not None else np.ones(xm.shape[1], np.float32)).astype(np.float64)
        for s in range(0, xm.shape[0], _ROWS):
            a = xm[s:s + _ROWS].astype(np.float64)
            den += float(((a * a) @ ww).sum())
            del a
    return den


def rel_weight_error(x: np.ndarray, xq: np.ndarray, w: np.ndarray | None, den: float | None = None) -> float:
    """sum_ij w_j (x - xq)^2 / sum_ij w_j x^2 in float64, a few thousand rows at a time (bounded memory); `den`:
    weight_energy(x, w) when already known. A 3-D expert tensor: the sums run over every expert, each with its
    own imatrix row (the relative output error of the whole MoE matmul under routed activations)."""
    num = 0.0
    for (xm, wm), qm in zip(_matrices(x, w), xq if x.ndim == 3 else [xq]):
        ww = (wm if wm is not None else np.ones(xm.shape[1], np.float32)).astype(np.float64)
        for s in range(0, xm.shape[0], _ROWS):
            d = xm[s:s + _ROWS].astype(np.float64) - qm[s:s + _ROWS]
            num += float(((d * d) @ ww).sum())
            del d
    den = weight_energy(x, w) if den is None else den
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
        self._wb = None  # the head in bfloat16 for of_delta, made once

    def drop_bf16(self) -> None:
        """Free the bfloat16 head copy of_delta made (no further deltas to score)."""
        self._wb = None

    def of_delta(self, h, dh, head_dw=None) -> float:
        """Mean per-token KL(base || perturbed) for final hidden states h + dh (the delta carried through the final
        norm and the head as in analyzer.delta_block; `head_dw`: a bfloat16 delta of the head weight, if tied)."""
        torch = self.torch
        dx = rms_delta(torch, self.norm, h, dh).reshape(-1, h.shape[-1])
        if self._wb is None:
            self._wb = self.head_w.to(torch.bfloat16)
        wb = self._wb
        kl = 0.0
        for k, s in enumerate(range(0, dx.shape[0], 128)):
            dl = torch.nn.functional.linear(dx[s:s + 128].to(torch.bfloat16), wb).float()
            if head_dw is not None:
                xf = (self.x[s:s + 128] + dx[s:s + 128]).to(torch.bfloat16)
                dl = dl + torch.nn.functional.linear(xf, head_dw).float()
            lb = torch.log_softmax(self.base[k].double(), dim=-1)
            lq = torch.log_softmax(self.base[k].double() + dl.double(), dim=-1)
            kl += float((lb.exp() * (lb - lq)).sum())
        return max(kl / dx.shape[0], 0.0)

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
    block divides the tensor's rows (for the calibration type). Every perturbation is carried as a delta of the
    clean activations (analyzer.delta_block)."""
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
        streams: list[dict[str, Any]] = []   # perturbation deltas of the hidden states riding along the sweep
        emb_name = names.get(ls.arch.embed)
        e = ls.tensor(ls.arch.embed)
        h = torch.nn.functional.embedding(ids, e)
        if emb_name is not None:
            x = e.numpy()
            ct = cal_type(emb_name)
            cal = None
            den = weight_energy(x, imat(emb_name))

            def selected_delta(xq: np.ndarray):
                # (Q(E) - E)[ids], from the selected rows only: the same float32 subtractions as on the whole
                # matrix, without a second vocabulary x hidden temporary (2.1 GB each at Llama-3-8B's shapes)
                return torch.nn.functional.embedding(ids, torch.from_numpy(xq)) - h

            def calibration(xq: np.ndarray) -> tuple[Any, Any]:
                # the calibration stream's delta; the whole weight delta only when the head is this embedding
                return selected_delta(xq), (torch.from_numpy(xq) - e).to(torch.bfloat16) if ls.tied else None

            for qt in todo.get(emb_name, []):
                xq = quant_dequant(x, qt, imat(emb_name))
                row = TensorRow(rel_weight_error(x, xq, imat(emb_name), den))
                row.block_err = _rel(torch, selected_delta(xq), h)
                res.rows.setdefault(emb_name, {})[qt] = row
                if qt == ct:
                    cal = calibration(xq)
                del xq
            if cal is None:
                cal = calibration(quant_dequant(x, ct, imat(emb_name)))
            d, head_dw = cal
            streams.append({"key": emb_name, "tensors": [emb_name], "d": d, "err": _rel(torch, d, h),
                            "head": head_dw})
            if emb_name in todo:
                tick(emb_name)
            del cal, d, head_dw
        del e
        ctx = ls.context(h)

        # ---- blocks ---------------------------------------------------------------------------------------------
        for i in range(ls.n_layer):
            with ls.block(i) as layer:
                if not supports_layer(layer):
                    raise QuantGateError(f"block {i} of {model_path} does not have the llama block layout the "
                                         "streamed measurement needs: use --measure-mode exact")
                y = ls.run_block(layer, i, h, ctx)
                upd = y - h
                cos, sin = ctx["position_embeddings"][ls.layer_types[i]]  # per attention type (runtime.layer_stream)
                base = BlockBase(torch, layer, h, cos, sin, _window(ls, i))
                params = dict(layer.named_parameters())
                prefix = ls.arch.layer_prefix.format(i=i)
                cal: dict[str, dict[str, Any]] = {}
                for pname, key in PARAMS.items():
                    g = names.get(prefix + pname)
                    if g is None:
                        continue
                    x = params[pname].data.numpy()
                    ct = cal_type(g)
                    cal_dw = None
                    den = weight_energy(x, imat(g))
                    for qt in todo.get(g, []):
                        xq = quant_dequant(x, qt, imat(g))
                        row = TensorRow(rel_weight_error(x, xq, imat(g), den))
                        dw = torch.from_numpy(xq - x).to(torch.bfloat16)
                        if qt == ct:
                            cal_dw = dw
                        row.block_err = _rel(torch, base.delta(dw={key: dw}), upd) if row.est_error > 0 else 0.0
                        res.rows.setdefault(g, {})[qt] = row
                        del xq, dw
                    if cal_dw is None:
                        cal_dw = torch.from_numpy(quant_dequant(x, ct, imat(g)) - x).to(torch.bfloat16)
                    cal.setdefault(_group_of(pname), {})[key] = (g, cal_dw)
                    if g in todo:
                        tick(g)
                # perturbed streams started earlier run through this block with its clean weights
                _advance(base, streams)
                # this block's calibration perturbations start their streams here
                for grp, repl in cal.items():
                    d = base.delta(dw={k: v for k, (_, v) in repl.items()})
                    streams.append({"key": f"blk.{i}.{grp}", "tensors": [g for g, _ in repl.values()], "d": d,
                                    "err": _rel(torch, d, upd)})
                del cal, base, params, upd
                x = None
            h = y

        # ---- head: each stream's whole-model KLD -> gains (streams freed as they are done), then output.weight
        # exactly (its candidates' full quantized copies never share memory with the streams) ----------------------
        with ls.head() as (norm, w):
            kld = _KLD(torch, norm, w, h)
            while streams:
                s = streams.pop(0)
                k = kld.of_delta(h, s["d"], s.get("head"))
                gain = k / s["err"] if s["err"] > 0 else 0.0
                res.gain_detail[s["key"]] = {"kld": k, "block_err": s["err"], "gain": gain}
                for name in s["tensors"]:
                    res.gains[name] = gain
                del s
            kld.drop_bf16()
            out_name = names.get(ls.arch.head) if not ls.tied else None
            if out_name is not None:
                x = w.numpy()
                den = weight_energy(x, imat(out_name))
                for qt in todo.get(out_name, []):
                    xq = quant_dequant(x, qt, imat(out_name))
                    row = TensorRow(rel_weight_error(x, xq, imat(out_name), den))
                    row.measured_kld, row.measured_mse = kld.of_normed(kld.x, torch.from_numpy(xq))
                    res.rows.setdefault(out_name, {})[qt] = row
                    del xq
                if out_name in todo:
                    tick(out_name)
    missing = [n for n in todo if n not in res.rows]
    if missing:
        raise QuantGateError(f"tensors {', '.join(missing[:5])} were not found in the model's blocks")
    return res


#: architectures whose decoder block has the llama layout analyzer.delta_block computes deltas for (and whose
#: weights map to GGUF names through the llama tables): the streamed measurement runs on these; the layer-streamed
#: runtime knows more (runtime.layer_stream.ARCHS), which the analyzer measures with the exact whole-model path
STREAM_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})


def can_stream(path: "str | os.PathLike[str]") -> bool:
    """Whether the streamed measurement (and the streamed weight readers) can run on this checkpoint."""
    return model_type_of(path) in STREAM_MODEL_TYPES


def _window(ls: LayerStream, i: int) -> int | None:
    """Block i's sliding attention window (None: full causal attention)."""
    win = getattr(ls.config, "sliding_window", None)
    if ls.layer_types[i] == "sliding_attention" or (ls.config.model_type == "mistral" and win):
        return int(win) if win else None
    return None


def _rel(torch, d, ref) -> float:
    den = float((ref.double() ** 2).sum())
    return float((d.double() ** 2).sum()) / den if den > 0 else 0.0


def _advance(base: BlockBase, streams: list[dict[str, Any]]) -> None:
    """Carry every perturbation delta through block i (clean weights), a few streams per call."""
    import torch

    for s in range(0, len(streams), _STREAMS_PER_CALL):
        part = streams[s:s + _STREAMS_PER_CALL]
        out = base.delta(dh=torch.stack([p["d"] for p in part]))
        for k, p in enumerate(part):
            p["d"] = out[k].clone()
        del out
