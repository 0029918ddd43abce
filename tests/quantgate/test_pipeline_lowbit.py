"""The i-quant, ternary, MXFP4 and Q2_K_S file types end to end: for every file type whose tensor types all have a
kernel in quant, every tensor's type and bytes equal llama_model_quantize's (with an importance matrix); for a file
type that needs a type quant has no kernel for, `quantgate quantize` refuses with one error line naming it (exit 2)
and writes nothing. As kernels land in quant's table, the same parameters turn into byte comparisons."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core.records import QuantizeRequest
from quant.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf
from quant.loaders import open_checkpoint
from quant.mixes import LOWBIT_FTYPES, PRECISIONS, missing_kernels, tensor_types
from quant.model_plan import plan_model
from quantgate.cli import app
from quantgate.pipeline import quantize_model
from quantgate.sample import SampleShape, make_sample_checkpoint
from tests.quantgate.test_pipeline_llamacpp import _assert_same

SHAPE = SampleShape(n_layer=2, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=256)  # n_gqa 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """An F16 GGUF and an importance matrix file covering every matmul weight (not token_embd)."""
    d = tmp_path_factory.mktemp("lowbit")
    hf = make_sample_checkpoint(d / "hf", SHAPE, seed=11)
    f16 = d / "model-F16.gguf"
    quantize_model(QuantizeRequest(source=hf, out=f16, precision="F16"), record=False)
    rng = np.random.default_rng(3)
    entries = {}
    with open_checkpoint(f16) as ck:
        for t in ck.tensors:
            if len(t.shape) == 2 and t.name != "token_embd.weight":
                entries[t.name] = ImatrixEntry(sums=(rng.gamma(0.5, 2.0, t.shape[-1]) * 37 + 1).astype(np.float32),
                                               counts=np.array([37], dtype=np.float32))
    imat = Imatrix(entries=entries, datasets=["test"], chunk_count=1, chunk_size=512)
    ipath = d / "imatrix.gguf"
    save_imatrix_gguf(imat, ipath)
    return f16, ipath, {n: imat.values(n) for n in entries}


def _planned(f16: Path, ftype: str, names: set[str]) -> dict[str, str]:
    with open_checkpoint(f16) as ck:
        return tensor_types(plan_model(ck), ftype, imatrix_names=names)


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", sorted(LOWBIT_FTYPES))
def test_bytes_match_llama_or_the_missing_kernel_is_named(require_oracle, model, tmp_path, ftype):
    f16, ipath, values = model
    missing = missing_kernels(_planned(f16, ftype, set(values)))
    ours = tmp_path / "ours.gguf"
    if missing:
        res = CliRunner().invoke(app, ["quantize", "-m", str(f16), "-p", ftype.lower(), "--imatrix", str(ipath),
                                       "-o", str(ours), "-q"])
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
        assert all(t in lines[0] for t in missing), lines[0]
        assert not ours.exists() and not list(tmp_path.iterdir())
        return
    ref = tmp_path / "ref.gguf"
    assert require_oracle.llama_model_quantize(f16, ref, PRECISIONS[ftype].llama_ftype, imatrix=values) == 0
    art = quantize_model(QuantizeRequest(source=f16, out=ours, precision=ftype, imatrix=ipath), record=False)
    assert art.file_type == PRECISIONS[ftype].llama_ftype
    _assert_same(ours, ref)
