"""Tokenizer export: the converter's tables, token typing, padding and the BPE pre-tokenizer decision."""
from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

import pytest

from core.errors import CheckpointError
from quant.tokenizer_gguf import (
    CHKTXT,
    KNOWN_PRE_HASHES,
    PRE_BY_SPLIT_REGEX,
    bpe_pre,
    does_token_look_special,
    sentencepiece_vocab,
    tokenizer_kvs,
)
from tests.conftest import require_llamacpp_src
from tests.quantgate.tiny_hf import QWEN2_SPLIT_REGEX, write_sentencepiece


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    write_sentencepiece(d)
    return d


def test_known_hashes_and_probe_text_are_the_pinned_converters():
    src = (require_llamacpp_src() / "conversion" / "base.py").read_text(encoding="utf-8")
    body = src[src.index("# Marker: Start get_vocab_base_pre"):src.index("# Marker: End get_vocab_base_pre")]
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    assert len(pairs) == body.count("if chkhsh ==")
    assert KNOWN_PRE_HASHES == dict(pairs)  # later `if`s win, as in the converter
    probe = re.search(r"\n\s*chktxt = ('.*')\n", body).group(1)
    assert eval(probe) == CHKTXT  # noqa: S307 - a string literal from the pinned source


def test_split_regexes_are_llama_cpps_originals():
    src = (require_llamacpp_src() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    for regex in PRE_BY_SPLIT_REGEX:
        as_cpp = regex.replace("\\", "\\\\")
        assert f'"{as_cpp}"' in src, regex
    assert QWEN2_SPLIT_REGEX in PRE_BY_SPLIT_REGEX and PRE_BY_SPLIT_REGEX[QWEN2_SPLIT_REGEX] == "qwen2"


@pytest.mark.parametrize("tok,special", [
    ("<|im_end|>", True), ("<｜begin▁of▁sentence｜>", True), ("<unused12>", True), ("<pad>", True),
    ("<mask>", True), (b"<|x|>", True), ("<s>", False), ("hello", False), ("<|im_end", False),
])
def test_does_token_look_special(tok, special):
    assert does_token_look_special(tok) is special


def test_sentencepiece_types_scores_and_padding(spm_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tokens, scores, types = sentencepiece_vocab(spm_dir, 520)
    assert len(tokens) == len(scores) == len(types) == 520
    assert (tokens[0], types[0]) == (b"<unk>", 2) and (tokens[1], types[1]) == (b"<s>", 3)
    assert types[2] == 3 and tokens[3] == b"<0x00>" and types[3] == 6
    assert sum(t == 6 for t in types) == 256
    assert tokens[512:] == [f"[PAD{i}]".encode() for i in range(512, 520)]
    assert types[512:] == [5] * 8 and scores[512:] == [-10000.0] * 8
    assert scores[300] == sp.GetScore(300) and tokens[300] == sp.IdToPiece(300).encode()


def test_sentencepiece_added_tokens_decoder(tmp_path, spm_dir):
    for f in spm_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"500": {"content": "<|tool|>", "special": False},
                                   "501": {"content": "\u2581hi\u2581there", "special": False},
                                   "502": {"content": "<eot>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tokens, scores, types = sentencepiece_vocab(tmp_path, None)
    assert (tokens[500], types[500], scores[500]) == (b"<|tool|>", 3, -1000.0)  # looks special -> CONTROL
    assert (tokens[501], types[501]) == (b" hi there", 4)  # USER_DEFINED, spaces pre-normalized
    assert (tokens[502], types[502]) == (b"<eot>", 3)


def test_sentencepiece_kv_order_and_special_ids(spm_dir):
    exp = tokenizer_kvs(spm_dir, "llama", {"vocab_size": 512, "bos_token_id": 1})
    keys = [kv.key for kv in exp.kv]
    assert keys == ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                    "tokenizer.chat_template"]
    assert (exp.model, exp.pre, exp.pre_source, exp.n_tokens) == ("llama", "default", "sentencepiece", 512)
    # no tokenizer.json and no *_token_id in this folder's config.json: llama.cpp falls back to its SPM defaults
    assert not any(k.endswith("_token_id") for k in keys)


def test_no_tokenizer_files_gives_no_kvs(tmp_path):
    exp = tokenizer_kvs(tmp_path, "llama", {"vocab_size": 10})
    assert exp.kv == [] and exp.model is None


def test_unknown_arch_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="gpt2"):
        tokenizer_kvs(tmp_path, "gpt2", {})


def _tokenizer_json(d: Path, regex: str) -> None:
    (d / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}))


def test_bpe_pre_decision(tmp_path):
    known = next(h for h, n in KNOWN_PRE_HASHES.items() if n == "qwen2")
    unknown = sha256(b"not a tokenizer").hexdigest()
    assert bpe_pre(tmp_path, known, None) == ("qwen2", "chkhsh")
    assert bpe_pre(tmp_path, known, "gpt2") == ("gpt2", "override")
    _tokenizer_json(tmp_path, QWEN2_SPLIT_REGEX)
    assert bpe_pre(tmp_path, unknown, None) == ("qwen2", "regex")
    _tokenizer_json(tmp_path, r"\s+|\w+")
    with pytest.raises(CheckpointError, match=f"chkhsh {unknown}.*--tokenizer-pre"):
        bpe_pre(tmp_path, unknown, None)


def test_tekken_only_folder_is_refused(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tekken"):
        tokenizer_kvs(tmp_path, "llama", {})
