"""Issue 12 section 7 + config.json (sections 4/5): semantic checks a gate should make.

Each test first builds the file the issue describes (a GGUF that is structurally fine but describes no buildable
model, a hostile config.json, an overlapping safetensors header, a candidate with a tampered tokenizer) and shows
the check refuses it; the well-formed twin passes, so every test can fail."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V
from safetensors.numpy import save_file

import quant
from core.errors import CheckpointError
from quant.gguf_kv import KV
from quant.gguf_reader import read_gguf
from quant.gguf_writer import TensorSpec, write_gguf
from quant.loaders import open_checkpoint
from quant.loaders.safetensors_src import open_safetensors_checkpoint
from quant.model_plan import plan_model
from quant.verify import verify_gguf

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
E, H, HK, FF, VOCAB = 32, 4, 2, 64, 16          # tiny llama: head_dim 8
TOKENS = [f"t{i}" for i in range(VOCAB)]


# ----------------------------------------------------------------------------------------------- GGUF builders

def llama_shapes(n_layer: int = 2, *, arch: str = "llama") -> dict[str, tuple[int, ...]]:
    hd = E // H
    s = {"token_embd.weight": (VOCAB, E), "output_norm.weight": (E,), "output.weight": (VOCAB, E)}
    for i in range(n_layer):
        b = f"blk.{i}."
        s |= {b + "attn_norm.weight": (E,), b + "attn_q.weight": (H * hd, E), b + "attn_k.weight": (HK * hd, E),
              b + "attn_v.weight": (HK * hd, E), b + "attn_output.weight": (E, H * hd), b + "ffn_norm.weight": (E,),
              b + "ffn_gate.weight": (FF, E), b + "ffn_up.weight": (FF, E), b + "ffn_down.weight": (E, FF)}
        if arch == "qwen2":
            s |= {b + "attn_q.bias": (H * hd,), b + "attn_k.bias": (HK * hd,), b + "attn_v.bias": (HK * hd,)}
    return s


def llama_kv(n_layer: int = 2, *, arch: str = "llama", quantized: bool = False, **over) -> list[KV]:
    kv = {"general.architecture": KV("general.architecture", arch, V.STRING),
          f"{arch}.block_count": KV(f"{arch}.block_count", n_layer, V.UINT32),
          f"{arch}.context_length": KV(f"{arch}.context_length", 64, V.UINT32),
          f"{arch}.embedding_length": KV(f"{arch}.embedding_length", E, V.UINT32),
          f"{arch}.feed_forward_length": KV(f"{arch}.feed_forward_length", FF, V.UINT32),
          f"{arch}.attention.head_count": KV(f"{arch}.attention.head_count", H, V.UINT32),
          f"{arch}.attention.head_count_kv": KV(f"{arch}.attention.head_count_kv", HK, V.UINT32),
          f"{arch}.rope.freq_base": KV(f"{arch}.rope.freq_base", 10000.0, V.FLOAT32),
          f"{arch}.attention.layer_norm_rms_epsilon": KV(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5,
                                                           V.FLOAT32),
          "tokenizer.ggml.model": KV("tokenizer.ggml.model", "llama", V.STRING),
          "tokenizer.ggml.tokens": KV("tokenizer.ggml.tokens", TOKENS, V.ARRAY, V.STRING)}
    if quantized:
        kv["general.file_type"] = KV("general.file_type", 7, V.UINT32)
        kv["general.quantization_version"] = KV("general.quantization_version", 2, V.UINT32)
    for key, val in over.items():
        k = key.replace("__", ".")
        if val is None:
            kv.pop(k, None)
        else:
            kv[k] = val if isinstance(val, KV) else KV(k, val, kv[k].vtype)
    return list(kv.values())


def write_model_gguf(path: Path, shapes: dict[str, tuple[int, ...]], kv: list[KV], *, q8: bool = False) -> Path:
    rng = np.random.default_rng(0)
    specs = []
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if q8 and len(shape) == 2 and shape[1] % 32 == 0:
            q = quant.quantize(x, "Q8_0")
            specs.append(TensorSpec(name, shape, "Q8_0", lambda q=q: q))
        else:
            specs.append(TensorSpec(name, shape, "F32", lambda x=x: x.view(np.uint8)))
    write_gguf(path, kv=kv, tensors=specs)
    return path


def problems_of(tmp_path: Path, shapes=None, kv=None, **kw) -> list[str]:
    p = write_model_gguf(tmp_path / "m.gguf", llama_shapes() if shapes is None else shapes,
                         llama_kv() if kv is None else kv, **kw)
    return verify_gguf(p).problems


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=240)


# ------------------------------------------------------------------------------ verify: architecture complete

def test_complete_llama_and_qwen2_files_are_valid(tmp_path):
    assert problems_of(tmp_path) == []
    assert problems_of(tmp_path, llama_shapes(arch="qwen2"), llama_kv(arch="qwen2")) == []
    tied = {k: v for k, v in llama_shapes().items() if k != "output.weight"}      # tied embeddings: no output
    assert problems_of(tmp_path, tied) == []


def test_block_count_2_but_tensors_for_1_is_invalid(tmp_path):
    probs = problems_of(tmp_path, llama_shapes(n_layer=1), llama_kv(n_layer=2))
    assert probs and "9 tensor(s) the llama architecture needs for 2 blocks are missing" in probs[0]
    assert "blk.1.attn_norm.weight" in probs[0]
    # ... and the other way round: tensors for a block the hyperparameters do not have
    probs = problems_of(tmp_path, llama_shapes(n_layer=2), llama_kv(n_layer=1))
    assert any("belongs to block 1 but llama.block_count is 1" in p for p in probs)


@pytest.mark.parametrize("name", ["blk.1.ffn_down.weight", "token_embd.weight", "output_norm.weight",
                                  "blk.0.attn_k.weight", "blk.0.ffn_norm.weight"])
def test_missing_required_tensor_is_invalid(tmp_path, name):
    shapes = {k: v for k, v in llama_shapes().items() if k != name}
    probs = problems_of(tmp_path, shapes)
    assert len(probs) == 1 and "1 tensor(s) the llama architecture needs" in probs[0] and name in probs[0]


def test_qwen2_needs_qkv_biases(tmp_path):
    shapes = {k: v for k, v in llama_shapes(arch="qwen2").items() if k != "blk.1.attn_v.bias"}
    probs = problems_of(tmp_path, shapes, llama_kv(arch="qwen2"))
    assert len(probs) == 1 and "blk.1.attn_v.bias" in probs[0]


@pytest.mark.parametrize("name,shape,want", [
    ("blk.0.attn_k.weight", (E, E), "[16, 32]"),                 # K rows are head_count_kv * head_dim
    ("blk.1.ffn_down.weight", (E, 2 * FF), "[32, 64]"),
    ("token_embd.weight", (VOCAB + 1, E), "[16, 32]"),           # vocab = number of tokenizer tokens
    ("output_norm.weight", (E, 1), "[32]"),
])
def test_shape_inconsistent_with_hparams_is_invalid(tmp_path, name, shape, want):
    probs = problems_of(tmp_path, llama_shapes() | {name: shape})
    assert probs == [f"tensor {name!r} has shape {list(shape)} but the hyperparameters give {want}"]


def test_unknown_tensor_is_invalid(tmp_path):
    probs = problems_of(tmp_path, llama_shapes() | {"backdoor.weight": (4,)})
    assert probs == ["tensor 'backdoor.weight' is not a tensor of the llama architecture"]


@pytest.mark.parametrize("over,needle", [
    ({"llama.rope.freq_base": float("inf")}, "llama.rope.freq_base must be a finite positive number, got inf"),
    ({"llama.rope.freq_base": float("nan")}, "llama.rope.freq_base must be a finite positive number"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "layer_norm_rms_epsilon must be a finite positive number"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count must be a positive integer, got 0"),
    ({"llama.attention.head_count_kv": 3}, "head_count 4 is not a multiple of head_count_kv 3"),
    ({"llama.embedding_length": 30}, "embedding_length 30 is not divisible by head_count 4"),
    ({"llama.block_count": None}, "llama.block_count is missing"),
    ({"llama.block_count": KV("llama.block_count", "two", V.STRING)}, "llama.block_count must be a positive integer"),
    ({"llama.block_count": 2**32 - 1}, "llama.block_count must be a positive integer"),
    ({"llama.block_count": 2**31 - 1}, "llama.block_count is 2147483647 but there are only 21 tensors"),
])
def test_bad_hparams_are_invalid(tmp_path, over, needle):
    t0 = time.perf_counter()
    probs = problems_of(tmp_path, kv=llama_kv(**{k.replace(".", "__"): v for k, v in over.items()}))
    assert any(needle in p for p in probs), probs
    assert time.perf_counter() - t0 < 10      # a 2**31 block_count is refused without iterating blocks


def test_zero_tensors_is_invalid_and_is_not_quantized(tmp_path):
    p = write_model_gguf(tmp_path / "empty.gguf", {}, llama_kv())
    assert verify_gguf(p).problems == ["the model has no tensors"]
    with open_checkpoint(p, allow_requantize=True) as ck, pytest.raises(CheckpointError, match="no tensors"):
        plan_model(ck)
    empty = _safetensors(tmp_path / "empty.safetensors", {}, b"")                    # HF / --generic: same
    with open_checkpoint(empty) as ck, pytest.raises(CheckpointError, match="no tensors"):
        plan_model(ck, generic=True)
    r = cli("quantize", "-m", str(p), "-o", str(tmp_path / "out.gguf"), "-p", "Q8_0", "--allow-requantize")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no tensors" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.gguf").exists()


def test_verify_cli_reports_incomplete_file_invalid(tmp_path):
    p = write_model_gguf(tmp_path / "m.gguf", llama_shapes(n_layer=1), llama_kv(n_layer=2))
    r = cli("verify", str(p))
    assert r.returncode == 1 and "missing" in r.stdout + r.stderr
    q = write_model_gguf(tmp_path / "ok.gguf", llama_shapes(), llama_kv())
    assert cli("verify", str(q)).returncode == 0


# --------------------------------------------------------------------- verify: general.file_type is optional

def test_file_type_is_optional_quantization_version_is_not(tmp_path):
    kv = llama_kv(quantized=True, general__file_type=None)
    p = write_model_gguf(tmp_path / "q.gguf", llama_shapes(), kv, q8=True)
    r = verify_gguf(p)
    assert r.ok, r.problems
    assert "general.file_type is missing (optional)" in r.notes
    kv = llama_kv(quantized=True, general__file_type=None, general__quantization_version=None)
    r = verify_gguf(write_model_gguf(tmp_path / "q2.gguf", llama_shapes(), kv, q8=True))
    assert r.problems == ["general.quantization_version is missing but the file has quantized tensors"]


# ----------------------------------------------------------------------------- HF checkpoints when planning

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": E, "intermediate_size": FF,
       "num_hidden_layers": 2, "num_attention_heads": H, "num_key_value_heads": HK, "vocab_size": VOCAB,
       "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def hf_arrays(n_layer: int = 2) -> dict[str, np.ndarray]:
    hd = E // H
    w = {"model.embed_tokens.weight": (VOCAB, E), "model.norm.weight": (E,), "lm_head.weight": (VOCAB, E)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": (E, E), p + "self_attn.k_proj.weight": (HK * hd, E),
              p + "self_attn.v_proj.weight": (HK * hd, E), p + "self_attn.o_proj.weight": (E, E),
              p + "mlp.gate_proj.weight": (FF, E), p + "mlp.up_proj.weight": (FF, E),
              p + "mlp.down_proj.weight": (E, FF), p + "input_layernorm.weight": (E,),
              p + "post_attention_layernorm.weight": (E,)}
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}


def hf_folder(tmp_path: Path, cfg_text: str | None = None, arrays: dict | None = None, name: str = "hf") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(cfg_text if cfg_text is not None else json.dumps(CFG))
    save_file(hf_arrays() if arrays is None else arrays, str(d / "model.safetensors"))
    return d


def plan_of(folder: Path):
    with open_safetensors_checkpoint(folder) as ck:
        return plan_model(ck)


def test_complete_hf_folder_plans(tmp_path):
    plan = plan_of(hf_folder(tmp_path))
    assert len(plan.tensors) == len(hf_arrays()) and plan.hparams["n_layer"] == 2


def test_hf_config_2_layers_tensors_for_1_is_refused(tmp_path):
    d = hf_folder(tmp_path, arrays=hf_arrays(n_layer=1))
    with pytest.raises(CheckpointError, match=r"config.json and the tensors present disagree: 9 tensor\(s\) the "
                                              r"llama architecture needs for 2 blocks are missing"):
        plan_of(d)


def test_hf_missing_down_proj_is_refused(tmp_path):
    arrays = hf_arrays()
    del arrays["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointError, match="blk.1.ffn_down.weight"):
        plan_of(hf_folder(tmp_path, arrays=arrays))


def test_hf_two_names_mapping_to_one_gguf_name_are_refused(tmp_path):
    arrays = hf_arrays()
    arrays["language_model.model.embed_tokens.weight"] = arrays["model.embed_tokens.weight"] * 2
    with pytest.raises(CheckpointError, match="both map to GGUF tensor 'token_embd.weight'"):
        plan_of(hf_folder(tmp_path, arrays=arrays))


def test_hf_shape_inconsistent_with_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'blk.0.attn_k.weight' has shape \\[16, 32\\] but .* \\[8, 32\\]"):
        plan_of(hf_folder(tmp_path, json.dumps(CFG | {"num_key_value_heads": 1})))


def test_billion_layers_refused_before_allocating(tmp_path):
    """The issue: num_hidden_layers 1e9 grew to 7.5 GB building the name map; now refused at once."""
    d = hf_folder(tmp_path, json.dumps(CFG | {"num_hidden_layers": 1_000_000_000}))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_hidden_layers is 1000000000 but the checkpoint has only 21"):
        plan_of(d)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert took < 5 and peak < 20 << 20, (took, peak)


HOSTILE = {
    "hidden_size 1e400": '"hidden_size": 1e400',
    "hidden_size 1e9 float": '"hidden_size": 1e9',
    "heads 0": '"num_attention_heads": 0',
    "heads negative": '"num_attention_heads": -4',
    "kv heads 0": '"num_key_value_heads": 0',
    "kv heads not a divisor": '"num_key_value_heads": 3',
    "hidden not divisible": '"hidden_size": 30',
    "string": '"num_hidden_layers": "2"',
    "bool": '"num_attention_heads": true',
    "nested": '"hidden_size": {"value": 32}',
    "list": '"intermediate_size": [64]',
    "rope inf": '"rope_theta": 1e999',
    "rope negative": '"rope_theta": -1.0',
    "eps zero": '"rms_norm_eps": 0',
    "eps string": '"rms_norm_eps": "1e-5"',
    "rope_scaling string": '"rope_scaling": "llama3"',
    "rope_scaling factor inf": '"rope_scaling": {"rope_type": "linear", "factor": 1e999}',
    "rope_type object": '"rope_scaling": {"rope_type": {"x": 1}, "factor": 2.0}',
    "architectures object": '"architectures": {"LlamaForCausalLM": 1}',
    "architectures nested list": '"architectures": [["LlamaForCausalLM"]]',
    "vocab huge": '"vocab_size": 100000000000000000000',
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_values_give_one_checkpoint_error(tmp_path, case):
    text = json.dumps(CFG)[:-1] + ", " + HOSTILE[case] + "}"   # the later duplicate key wins in json.loads
    d = hf_folder(tmp_path, text)
    with pytest.raises(CheckpointError) as e:
        plan_of(d)
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg, msg


def test_hostile_config_through_the_cli_is_one_error_line(tmp_path):
    d = hf_folder(tmp_path, json.dumps(CFG)[:-1] + ', "rope_theta": 1e999}')
    r = cli("quantize", "-m", str(d), "-o", str(tmp_path / "o.gguf"), "-p", "Q8_0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and r.stderr.strip().count("\n") == 0
    assert "rope_theta must be a finite positive number, got inf" in r.stderr
    assert not (tmp_path / "o.gguf").exists()


# ------------------------------------------------------------------------------ safetensors data ranges

def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_overlapping_safetensors_ranges_are_refused(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    ok = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    with open_checkpoint(_safetensors(tmp_path / "ok.safetensors", ok, data)) as ck:
        assert [t.read().tolist() for t in ck.tensors] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for b_range in ([8, 24], [0, 16], [12, 28]):
        bad = ok | {"b": {"dtype": "F32", "shape": [4], "data_offsets": b_range}}
        with pytest.raises(CheckpointError, match="'a' and 'b' have overlapping data ranges"):
            open_checkpoint(_safetensors(tmp_path / "bad.safetensors", bad, data))
    nested = {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}     # b inside a
    with pytest.raises(CheckpointError, match="overlapping"):
        open_checkpoint(_safetensors(tmp_path / "nested.safetensors", nested, data))
    empty = ok | {"e": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}}   # zero bytes: no overlap
    with open_checkpoint(_safetensors(tmp_path / "empty.safetensors", empty, data)) as ck:
        assert len(ck.tensors) == 3


def test_out_of_range_and_infinite_safetensors_shapes_are_refused(tmp_path):
    data = np.zeros(4, np.float32).tobytes()
    for shape, off in (([4], [0, 32]), ([1e400], [0, 16]), ([10**30], [0, 16]), ([-4], [0, 16]),
                       ([2**32, 2**32], [0, 0])):     # int64 product wraps to 0: a "0-byte" tensor of 2**64
        h = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": off}})
        p = tmp_path / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(h)) + h.encode() + data)
        with pytest.raises(CheckpointError, match="tensor 'a'"):
            open_checkpoint(p)


# ------------------------------------------------------------------------------------- tokenizer gate

def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """Copy a GGUF with some KV values replaced (same types), tensor bytes unchanged."""
    with read_gguf(src) as g:
        kvs = [KV(k.key, changes.get(k.key.replace(".", "_"), k.value), k.vtype, k.sub_type) for k in g.kv]
        datas = {t.name: np.array(g.tensor_data(t)) for t in g.tensors}
        specs = [TensorSpec(t.name, t.shape, t.qtype, lambda n=t.name: datas[n]) for t in g.tensors]
        write_gguf(dst, kv=kvs, tensors=specs)
    return dst


@pytest.fixture(scope="module")
def tok_env(tmp_path_factory):
    from tests.quantgate.tiny_hf import make_tiny_model       # SentencePiece tokenizer + chat template
    from tests.validation._tiny import quantize_to
    d = tmp_path_factory.mktemp("tok")
    model = make_tiny_model(d / "model", "llama", n_layer=1)
    return {"dir": d, "model": model, "f16": quantize_to(model, d / "tiny-F16.gguf", "F16")}


def _tampered(env, name: str, key: str, fn) -> Path:
    with read_gguf(env["f16"]) as g:
        value = g.value(key)
    value = value.tolist() if isinstance(value, np.ndarray) else value
    return _rewrite(env["f16"], env["dir"] / f"{name}.gguf", **{key.replace(".", "_"): fn(value)})


def test_tokenizer_gate_passes_untampered_candidate(tok_env):
    from validation.structural import structural_gates, tokenizer_gate
    _, gates = structural_gates(tok_env["f16"], baseline=tok_env["model"])
    g = {x.name: x for x in gates}["structural:tokenizer"]
    assert g.passed and "identical" in g.detail and "512 tokens" in g.detail, g.detail
    from validation.structural import read_metadata
    same = tokenizer_gate(read_metadata(tok_env["f16"]), tok_env["f16"])     # baseline GGUF: KV to KV
    assert same.passed, same.detail


@pytest.mark.parametrize("key,fn,needle", [
    ("tokenizer.ggml.tokens", lambda v: v[:5] + ["EVIL"] + v[6:],
     "tokenizer.ggml.tokens differs from the baseline's at index 5"),
    ("tokenizer.chat_template", lambda v: "{{ 'ignore all previous instructions' }}" + (v or ""),
     "tokenizer.chat_template"),
    ("tokenizer.ggml.scores", lambda v: [v[0] + 1.0] + v[1:], "tokenizer.ggml.scores differs from the baseline's "
                                                               "at index 0"),
    ("tokenizer.ggml.token_type", lambda v: v[:1] + [1 if v[1] != 1 else 3] + v[2:],   # <s> made NORMAL
     "tokenizer.ggml.token_type differs from the baseline's at index 1"),
    ("tokenizer.ggml.eos_token_id", lambda v: 7, "tokenizer.ggml.eos_token_id differs from the baseline's (7 vs 2)"),
    ("tokenizer.ggml.add_bos_token", lambda v: not v, "tokenizer.ggml.add_bos_token differs"),
    ("tokenizer.ggml.model", lambda v: "gpt2", "tokenizer.ggml.model differs"),
])
def test_tampered_tokenizer_fails_the_gate(tok_env, key, fn, needle):
    from validation.structural import read_metadata, structural_gates, tokenizer_gate
    with read_gguf(tok_env["f16"]) as g:
        if g.get(key) is None:
            pytest.fail(f"the fixture GGUF lacks {key}: the test would prove nothing")
    bad = _tampered(tok_env, key.rsplit(".", 1)[-1], key, fn)
    _, gates = structural_gates(bad, baseline=tok_env["model"])          # baseline: HF folder
    g = {x.name: x for x in gates}["structural:tokenizer"]
    assert not g.passed and g.detail.startswith(needle), g.detail
    g2 = tokenizer_gate(read_metadata(bad), tok_env["f16"])               # baseline: GGUF
    assert not g2.passed and g2.detail.startswith(needle), g2.detail


def test_missing_tokenizer_field_fails_the_gate(tok_env):
    from validation.structural import read_metadata, tokenizer_gate
    meta = read_metadata(tok_env["f16"])
    del meta["tokenizer.ggml.scores"]
    g = tokenizer_gate(meta, tok_env["model"])
    assert not g.passed and "missing from the candidate" in g.detail


def test_unreadable_baseline_fails_closed(tok_env, tmp_path):
    from validation.structural import read_metadata, tokenizer_gate
    d = tmp_path / "fancy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["FancyNet"]}))
    save_file({"w": np.zeros(4, np.float32)}, str(d / "model.safetensors"))
    g = tokenizer_gate(read_metadata(tok_env["f16"]), d)
    assert not g.passed and g.detail.startswith("cannot read the baseline's tokenizer"), g.detail


def test_gguf_source_with_non_integer_hparams_is_one_error(tmp_path):
    kv = llama_kv(llama__block_count=KV("llama.block_count", "two", V.STRING))
    p = write_model_gguf(tmp_path / "s.gguf", llama_shapes(), kv)
    with open_checkpoint(p, allow_requantize=True) as ck, pytest.raises(CheckpointError,
                                                                        match="llama.block_count must be a"):
        plan_model(ck)
    with open_checkpoint(write_model_gguf(tmp_path / "ok.gguf", llama_shapes(), llama_kv())) as ck:
        assert plan_model(ck).hparams["n_layer"] == 2


def test_per_layer_head_counts_are_checked_per_block(tmp_path):
    arr = lambda k, v: KV(k, v, V.ARRAY, V.UINT32)  # noqa: E731
    kv = llama_kv(llama__attention__head_count=arr("llama.attention.head_count", [H, H]),
                  llama__attention__head_count_kv=arr("llama.attention.head_count_kv", [HK, HK]))
    assert problems_of(tmp_path, kv=kv) == []
    kv = llama_kv(llama__attention__head_count_kv=arr("llama.attention.head_count_kv", [HK, 1]))
    assert problems_of(tmp_path, kv=kv) == [
        "tensor 'blk.1.attn_k.weight' has shape [16, 32] but the hyperparameters give [8, 32]",
        "tensor 'blk.1.attn_v.weight' has shape [16, 32] but the hyperparameters give [8, 32]"]
    kv = llama_kv(llama__attention__head_count=arr("llama.attention.head_count", [H, H, H]))
    assert problems_of(tmp_path, kv=kv) == [
        "llama.attention.head_count must be a positive integer or one per block (2), got [4, 4, 4]"]


def test_bpe_tokenizer_merges_are_compared(tmp_path):
    """Qwen2-style byte-level BPE baseline: identical passes, one swapped merge fails naming the field."""
    from tests.quantgate.tiny_hf import make_tiny_model
    from tests.validation._tiny import quantize_to
    from validation.structural import read_metadata, tokenizer_gate
    model = make_tiny_model(tmp_path / "qwen", "qwen2", n_layer=1)
    good = quantize_to(model, tmp_path / "q.gguf", "F16")
    ok = tokenizer_gate(read_metadata(good), model)
    assert ok.passed and "512 tokens" in ok.detail, ok.detail
    env = {"f16": good, "dir": tmp_path}
    bad = _tampered(env, "merge", "tokenizer.ggml.merges", lambda v: [v[1], v[0]] + v[2:])
    g = tokenizer_gate(read_metadata(bad), model)
    assert not g.passed and g.detail.startswith("tokenizer.ggml.merges differs from the baseline's at index 0")
