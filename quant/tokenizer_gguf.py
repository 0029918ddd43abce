"""Tokenizer metadata (tokenizer.* KVs) for an HF model folder, exactly as the pinned llama.cpp
convert_hf_to_gguf.py writes it, so that a GGUF made from an HF folder runs in llama.cpp.

Ported from conversion/base.py (_set_vocab_sentencepiece, _create_vocab_sentencepiece, _set_vocab_llama_hf,
_set_vocab_gpt2, get_vocab_base, get_vocab_base_pre, does_token_look_special) and conversion/llama.py /
conversion/qwen.py (set_vocab). Special ids, add_bos/add_eos, merges and the chat template come from
gguf.SpecialVocab (gguf 0.19.0), as in the converter.

BPE pre-tokenizer (tokenizer.ggml.pre): the converter hashes the token ids of a fixed probe text (chkhsh) and
looks the hash up in a table of known tokenizers (copied below from the pinned source); an unknown hash makes it
refuse. We do the same, with two documented escapes: an explicit `tokenizer_pre` override, and, when the hash is
unknown, recognising the pre-tokenizer by the exact split regex in tokenizer.json that llama.cpp implements for a
pre type (the "original regex from tokenizer.json" comments in src/llama-vocab.cpp). Anything else is an error
naming the hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from core.errors import CheckpointError
from quant.gguf_kv import KV

#: The probe text of get_vocab_base_pre (verbatim).
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

#: chkhsh -> tokenizer.ggml.pre, from the pinned get_vocab_base_pre (later entries win, as its chain of `if`s does).
KNOWN_PRE_HASHES: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}

#: Split regexes of tokenizer.json pre-tokenizers that llama.cpp implements as a pre type ("original regex from
#: tokenizer.json" in the pinned src/llama-vocab.cpp), used only when the chkhsh is unknown.
PRE_BY_SPLIT_REGEX: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}

_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED, _SPM_UNUSED, _SPM_BYTE = 1, 2, 3, 4, 5, 6
#: GGUF architecture -> which converter set_vocab it uses: LlamaModel's, Qwen2Model's (SentencePiece, else BPE) or
#: TextModel's default (BPE only: Qwen2MoeModel, Qwen3MoeModel)
_ARCH_FLAVOURS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen2", "qwen2moe": "gpt2", "qwen3moe": "gpt2",
                  "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3"}


@dataclass
class TokenizerExport:
    """The tokenizer KVs in the converter's order, and how they were derived (for reports and provenance)."""

    kv: list[KV]
    model: str | None = None          # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (BPE) or None (none)
    pre: str | None = None            # tokenizer.ggml.pre
    pre_source: str | None = None     # "sentencepiece" | "chkhsh" | "regex" | "override"
    chkhsh: str | None = None         # BPE only: hash of the probe text's token ids
    n_tokens: int = 0


def has_tokenizer(model_dir: Path) -> bool:
    """Whether the folder holds any tokenizer files the converter can read."""
    return any((model_dir / f).is_file()
               for f in ("tokenizer.model", "tokenizer.json", "vocab.json", "tekken.json"))


def does_token_look_special(token: str | bytes) -> bool:
    """convert_hf_to_gguf's heuristic for added tokens that should be CONTROL though not marked special."""
    text = token.decode("utf-8") if isinstance(token, (bytes, bytearray)) else token
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sentencepiece_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """_create_vocab_sentencepiece: tokens, scores and types from tokenizer.model (+ added tokens), padded to
    `vocab_size` with [PADi] UNUSED entries."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"File not found: {path}")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise CheckpointError("exporting a SentencePiece tokenizer (tokenizer.model) needs the `sentencepiece` "
                              "package") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    vocab_size = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [_SPM_UNUSED] * vocab_size
    for tid in range(min(sp.vocab_size(), vocab_size)):
        t = _SPM_NORMAL
        if sp.IsUnknown(tid):
            t = _SPM_UNKNOWN
        elif sp.IsControl(tid):
            t = _SPM_CONTROL
        elif sp.IsUnused(tid):
            t = _SPM_UNUSED
        elif sp.IsByte(tid):
            t = _SPM_BYTE
        tokens[tid], scores[tid], types[tid] = sp.IdToPiece(tid).encode("utf-8"), sp.GetScore(tid), t
    if (added := model_dir / "added_tokens.json").is_file():
        for key, tid in _read_json(added).items():
            if tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = key.encode("utf-8"), -1000.0, _SPM_USER_DEFINED
    if (tc := model_dir / "tokenizer_config.json").is_file():
        for tid_s, data in _read_json(tc).get("added_tokens_decoder", {}).items():
            tid, token = int(tid_s), data["content"]
            if tid >= vocab_size:
                continue
            if data.get("special") or does_token_look_special(token):
                types[tid] = _SPM_CONTROL
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types[tid] = _SPM_USER_DEFINED
            scores[tid], tokens[tid] = -1000.0, token.encode("utf-8")
    return tokens, scores, types


def bpe_pre(model_dir: Path, chkhsh: str, override: str | None) -> tuple[str, str]:
    """tokenizer.ggml.pre for a BPE tokenizer and where it came from: the override, the converter's chkhsh table,
    or the exact split regex of tokenizer.json; otherwise CheckpointError (the converter refuses too)."""
    if override:
        return override, "override"
    if chkhsh in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[chkhsh], "chkhsh"
    regexes = []
    if (tj := model_dir / "tokenizer.json").is_file():
        pre_tok = _read_json(tj).get("pre_tokenizer") or {}
        for p in pre_tok.get("pretokenizers", [pre_tok]):
            if p.get("type") == "Split" and isinstance(p.get("pattern"), dict) and "Regex" in p["pattern"]:
                regexes.append(p["pattern"]["Regex"])
    if len(regexes) == 1 and regexes[0] in PRE_BY_SPLIT_REGEX:
        return PRE_BY_SPLIT_REGEX[regexes[0]], "regex"
    raise CheckpointError(
        f"{model_dir}: the BPE pre-tokenizer was not recognized (chkhsh {chkhsh}); llama.cpp needs "
        "tokenizer.ggml.pre. convert_hf_to_gguf.py refuses such models too. If you know which llama.cpp "
        "pre-tokenizer the model uses, pass it with --tokenizer-pre NAME (e.g. qwen2, llama-bpe, gpt2)")


def gpt2_vocab(model_dir: Path, vocab_size: int | None, pre_override: str | None
               ) -> tuple[list[str], list[int], str, str, str]:
    """get_vocab_base + get_vocab_base_pre: tokens and types through transformers' AutoTokenizer (added tokens
    normalized, [PADi] for holes), plus the pre-tokenizer name, its source and the chkhsh."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise CheckpointError("exporting a BPE tokenizer needs the `transformers` package") from e
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.vocab
    vocab_size = vocab_size or len(vocab)
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer ids reach {max(vocab.values())} but vocab_size is {vocab_size}")
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    pre, source = bpe_pre(model_dir, chkhsh, pre_override)
    reverse = {i: t for t, i in vocab.items()}
    added_vocab = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added_vocab:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or does_token_look_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre, source, chkhsh


def phi3_vocab(model_dir: Path, vocab_size: int | None) -> tuple[list[bytes], list[float], list[int]]:
    """Phi3MiniModel.set_vocab's SentencePiece table: vocab_size slots ([PADi], UNUSED, -10000) filled from
    tokenizer.model, then added_tokens.json, tokenizer_config.json's added_tokens_decoder and tokenizer.json's
    added_tokens (USER_DEFINED, or CONTROL when special; score -1000); ids outside the table are refused."""
    import sentencepiece as spm

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: Phi-3 needs tokenizer.model")
    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n = int(vocab_size if vocab_size is not None else sp.vocab_size())
    if sp.vocab_size() > n:
        raise CheckpointError(f"{model_dir}: tokenizer.model has {sp.vocab_size()} pieces, vocab_size is {n}")
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores, types = [-10000.0] * n, [_SPM_UNUSED] * n
    for i in range(sp.vocab_size()):
        t = _SPM_NORMAL
        if sp.IsUnknown(i):
            t = _SPM_UNKNOWN
        elif sp.IsControl(i):
            t = _SPM_CONTROL
        elif sp.IsUnused(i):
            t = _SPM_UNUSED
        elif sp.IsByte(i):
            t = _SPM_BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), t
    if (f := model_dir / "added_tokens.json").is_file():
        for text, tid in _read_json(f).items():
            if isinstance(tid, int) and 0 <= tid < n:  # the converter ignores out-of-range ids
                tokens[tid], scores[tid], types[tid] = str(text).encode("utf-8"), -1000.0, _SPM_USER_DEFINED
    added = []
    if (f := model_dir / "tokenizer_config.json").is_file():
        added += [(k, v) for k, v in (_read_json(f).get("added_tokens_decoder") or {}).items()]
    if (f := model_dir / "tokenizer.json").is_file():
        added += [(d.get("id"), d) for d in _read_json(f).get("added_tokens") or []]
    for tid, data in added:
        try:
            i = int(tid)
            text = str(data["content"]).encode("utf-8")
        except (TypeError, ValueError, KeyError):
            raise CheckpointError(f"{model_dir}: malformed added token {_short_repr(tid)}") from None
        if not 0 <= i < n:
            raise CheckpointError(f"{model_dir}: added token id {i} is outside the vocabulary ({n})")
        tokens[i], scores[i] = text, -1000.0
        types[i] = _SPM_CONTROL if data.get("special") else _SPM_USER_DEFINED
    return tokens, scores, types


def _short_repr(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _set_sentencepiece(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None, exp: TokenizerExport) -> None:
    tokens, scores, types = sentencepiece_vocab(model_dir, vocab_size)
    _write_llama_vocab(w, model_dir, tokens, scores, types, exp)


def _write_llama_vocab(w: gguf.GGUFWriter, model_dir: Path, tokens: list, scores: list, types: list,
                       exp: TokenizerExport) -> None:
    """The tokenizer.* keys of a SentencePiece-style ("llama") vocabulary, as the converter writes them."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    exp.model, exp.pre, exp.pre_source, exp.n_tokens = "llama", "default", "sentencepiece", len(tokens)


def _set_llama_hf(w: gguf.GGUFWriter, model_dir: Path, exp: TokenizerExport) -> None:
    vocab = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    _write_llama_vocab(w, model_dir, tokens, scores, types, exp)


def _set_gpt2(w: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None, pre_override: str | None,
              exp: TokenizerExport) -> None:
    tokens, types, pre, source, chkhsh = gpt2_vocab(model_dir, vocab_size, pre_override)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(w, quiet=True)
    exp.model, exp.pre, exp.pre_source, exp.chkhsh, exp.n_tokens = "gpt2", pre, source, chkhsh, len(tokens)


def tokenizer_kvs(model_dir: Path, arch: str, hparams: dict[str, Any], *,
                  tokenizer_pre: str | None = None) -> TokenizerExport:
    """The tokenizer.* KVs convert_hf_to_gguf.py writes for `arch` ("llama" for Llama/Mistral, "qwen2") from the
    folder's tokenizer files; an empty export when the folder has none (the GGUF then cannot run in llama.cpp)."""
    model_dir = Path(model_dir)
    flavour = _ARCH_FLAVOURS.get(arch)
    if flavour is None:
        raise CheckpointError(f"no tokenizer export for architecture {arch!r}")
    exp = TokenizerExport(kv=[])
    if not has_tokenizer(model_dir):
        return exp
    w = gguf.GGUFWriter(path=None, arch=arch)
    vocab_size = hparams.get("vocab_size")
    if flavour == "llama":  # LlamaModel.set_vocab (HF folders; Mistral's consolidated format is not read here)
        if (model_dir / "tekken.json").is_file() and not (model_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"{model_dir}: Mistral tekken.json tokenizers are not supported; "
                                  "convert this model with llama.cpp's convert_hf_to_gguf.py")
        if (tc := model_dir / "tokenizer_config.json").is_file():
            if (add_prefix_space := _read_json(tc).get("add_prefix_space")) is not None:
                w.add_add_space_prefix(add_prefix_space)
        try:
            _set_sentencepiece(w, model_dir, vocab_size, exp)
        except FileNotFoundError:
            try:
                _set_llama_hf(w, model_dir, exp)
            except (FileNotFoundError, TypeError):
                _set_gpt2(w, model_dir, vocab_size, tokenizer_pre, exp)
        if hparams.get("vocab_size", 32000) == 32016:  # CodeLlama infill tokens
            special = gguf.SpecialVocab(model_dir, load_merges=False,
                                        special_token_types=["prefix", "suffix", "middle", "eot"])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                special._set_special_token(typ, tid)
            special.add_to_gguf(w, quiet=True)
        if hparams.get("vocab_size", 32000) == 49152:  # granite small models
            w.add_add_bos_token(False)
    elif flavour == "phi3":  # Phi3MiniModel.set_vocab
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file() and _read_json(tc).get("tokenizer_class") == "GPT2Tokenizer":
            _set_gpt2(w, model_dir, vocab_size, tokenizer_pre, exp)
        else:
            tokens, scores, types = phi3_vocab(model_dir, vocab_size)
            _write_llama_vocab(w, model_dir, tokens, scores, types, exp)
    elif flavour == "gemma2" or (flavour == "gemma3" and (model_dir / "tokenizer.model").is_file()):
        _set_sentencepiece(w, model_dir, vocab_size, exp)  # Gemma2Model / Gemma3Model.set_vocab
        w.add_add_space_prefix(False)
    elif flavour in ("gpt2", "gemma3"):  # TextModel.set_vocab; Gemma 3 without tokenizer.model
        _set_gpt2(w, model_dir, vocab_size, tokenizer_pre, exp)
    else:  # Qwen2Model.set_vocab
        try:
            _set_sentencepiece(w, model_dir, vocab_size, exp)
        except FileNotFoundError:
            _set_gpt2(w, model_dir, vocab_size, tokenizer_pre, exp)
    exp.kv = [kv_from_writer(k, v) for k, v in w.kv_data[0].items() if k != "general.architecture"]
    return exp


def kv_from_writer(key: str, v: Any) -> KV:
    """A gguf.GGUFWriter entry as a KV, with the array element type GGUFWriter would infer when writing."""
    sub = v.sub_type
    if v.type == gguf.GGUFValueType.ARRAY and sub is None and len(v.value):
        sub = gguf.GGUFValueType.get_type(v.value[0])  # what GGUFWriter._pack_val infers when writing
    return KV(key, v.value, v.type, sub)
