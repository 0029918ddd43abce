"""analyzer.delta_block against the block itself: the delta of a perturbed input and of perturbed weights equals
block(h + dh; W + dW) - block(h; W) computed in float64 (the block's own forward, transformers' module)."""
from __future__ import annotations

import copy

import pytest

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "models/reference"


@pytest.fixture(scope="module")
def block():
    import torch

    from runtime.layer_stream import LayerStream

    torch.manual_seed(0)
    with LayerStream(REF) as ls, torch.inference_mode():
        ids = torch.randint(0, ls.n_vocab, (2, 48))
        h = ls.embed([r.tolist() for r in ids])
        h = torch.cat(h, dim=0)
        ctx = ls.context(h)
        with ls.block(1) as layer:
            ref = copy.deepcopy(layer).double()
            yield ls, layer, ref, h, ctx


def _ref_delta(ls, ref, h, ctx, dh, dw):
    import torch

    from analyzer.delta_block import PARAMS

    c64 = {**ctx, "position_embeddings": {k: tuple(t.double() for t in v) for k, v in ctx["position_embeddings"].items()}}
    mask = ctx["masks"]["full_attention"]
    c64["masks"] = {"full_attention": mask.double() if torch.is_tensor(mask) and mask.is_floating_point() else mask}
    y0 = ls.run_block(ref, 1, h.double(), c64)
    params = dict(ref.named_parameters())
    keys = {k: p for p, k in PARAMS.items()}
    old = {}
    for k, d in dw.items():
        old[k] = params[keys[k]].data
        params[keys[k]].data = old[k] + d.double()
    try:
        y1 = ls.run_block(ref, 1, (h + (dh if dh is not None else 0)).double(), c64)
    finally:
        for k, v in old.items():
            params[keys[k]].data = v
    return y1 - y0


@pytest.mark.parametrize("case", ["input", "q", "k", "v", "o", "gate", "up", "down", "ffn_group"])
def test_delta_matches_the_float64_block(block, case):
    import torch

    from analyzer.delta_block import PARAMS, BlockBase

    ls, layer, ref, h, ctx = block
    cos, sin = ctx["position_embeddings"]["full_attention"]
    base = BlockBase(torch, layer, h, cos, sin)
    g = torch.Generator().manual_seed(1)
    params = dict(layer.named_parameters())
    keys = {k: p for p, k in PARAMS.items()}
    dh, dw = None, {}
    if case == "input":
        dh = 1e-3 * h.std() * torch.randn(h.shape, generator=g)
    else:
        for k in (["gate", "up", "down"] if case == "ffn_group" else [case]):
            w = params[keys[k]].data
            dw[k] = (1e-3 * w.std() * torch.randn(w.shape, generator=g)).to(torch.bfloat16).float()
    with torch.inference_mode():
        got = base.delta(dh, {k: v.to(torch.bfloat16) for k, v in dw.items()})
        want = _ref_delta(ls, ref, h, ctx, dh, dw)
    rel = float(((got.double() - want) ** 2).sum() / (want ** 2).sum()) ** 0.5
    assert float((want ** 2).sum()) > 0
    assert rel < 2e-2, (case, rel)  # bfloat16 delta matmuls: ~3 significant digits


def test_stacked_streams_broadcast(block):
    import torch

    from analyzer.delta_block import BlockBase

    ls, layer, ref, h, ctx = block
    cos, sin = ctx["position_embeddings"]["full_attention"]
    base = BlockBase(torch, layer, h, cos, sin)
    g = torch.Generator().manual_seed(2)
    d = torch.stack([1e-3 * h.std() * torch.randn(h.shape, generator=g) for _ in range(3)])
    with torch.inference_mode():
        both = base.delta(d)
        one = base.delta(d[1])
    # batched and single matmuls block differently: equal up to float rounding at the delta's own scale
    torch.testing.assert_close(both[1], one, rtol=1e-4, atol=1e-4 * float(one.abs().max()))
