"""Tiny, deterministic HF checkpoints with real tokenizers for the convert / llama.cpp runtime tests:
random Llama / Mistral / Phi-3 / Gemma 2 / Qwen2 / Qwen3 and MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) models
(transformers, saved as float16 safetensors) plus a SentencePiece model (Llama/Mistral/Phi-3/Gemma style, byte
fallback) or a byte-level BPE tokenizer.json (Qwen style) trained on a small corpus."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
_WORDS = ("the a model quantized weights tensor llama runs fast on small machines with every layer and block "
          "numbers like 42 and 3.14 appear; people write code, tests, notes. Why? Because bytes matter! "
          "gguf ggml file format header alignment token vocabulary merge score type river mountain cloud "
          "bright quiet green seven eleven hundred thousand café naïve über Ünïcödé 東京 ✅ 🚀").split()

EVAL_TEXTS = (
    "The model runs fast on small machines, and every layer matters.",
    "Quantized weights: 42 tensors with 3.14 bits each? Bytes matter!",
    "A quiet river under the bright green mountain; seven clouds.",
    "gguf files have a header, an alignment and tensor data. Café über 東京 ✅",
)


def corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines to train the tiny tokenizers on."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n_lines)]
    return lines + list(EVAL_TEXTS)


def write_sentencepiece(model_dir: Path, vocab_size: int = 512, *, dummy_prefix: bool = True) -> None:
    """Train a Llama-style SentencePiece BPE model (byte fallback, identity normalization) into the folder, with
    tokenizer_config.json as Llama checkpoints ship it."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix,
        split_digits=True, num_threads=1, minloglevel=2)
    (model_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer", "legacy": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def write_bpe(model_dir: Path, vocab_size: int = 512) -> int:
    """Train a Qwen2-style byte-level BPE tokenizer.json (Qwen2's split regex, <|endoftext|> etc. as specials) and
    save it with transformers so tokenizer_config.json is what HF writes; returns the id of <|im_end|> (eos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    return tok.token_to_id("<|im_end|>")


def make_tiny_model(model_dir: Path, arch: str, *, seed: int = 0, n_layer: int = 2, init: float = 0.08) -> Path:
    """Write a random tiny HF model (`arch`: llama | mistral | phi3 | phi3longrope | gemma2 | gemma3 | gemma3mm (the
    multimodal Gemma3ForConditionalGeneration, a 1-layer SigLIP tower) | qwen2 | qwen3 | mixtral | qwen2moe | qwen3moe;
    hidden 256, GQA 4/2 heads, vocab 512, experts of 256 rows) in float16 with its tokenizer (SentencePiece for
    llama/mistral/phi3/gemma2/mixtral, byte-level BPE for the Qwen family); returns the folder."""
    import torch
    import transformers as tf

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=n_layer,
                  vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=init)
    if arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=512, bos_token_id=1, eos_token_id=2, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(intermediate_size=768, bos_token_id=1, eos_token_id=2, sliding_window=None,
                               rope_theta=100000.0, **common)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=768, tie_word_embeddings=True, bos_token_id=None,
                             **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mixtral":  # 8 experts: llama.cpp's n_expert == 8 mix rules apply
        cfg = tf.MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, bos_token_id=1,
                               eos_token_id=2, sliding_window=None, **common)
        cls = tf.MixtralForCausalLM
    elif arch == "qwen2moe":  # 4 routed experts + a shared expert with its sigmoid gate
        cfg = tf.Qwen2MoeConfig(intermediate_size=768, moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                num_experts=4, num_experts_per_tok=2, bos_token_id=None, **common)
        cls = tf.Qwen2MoeForCausalLM
    elif arch == "phi3":  # fused qkv_proj / gate_up_proj, as Phi-3-mini-4k (no LongRoPE)
        cfg = tf.Phi3Config(intermediate_size=512, original_max_position_embeddings=512, bos_token_id=1,
                            eos_token_id=2, pad_token_id=None, **common)
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma2":  # tied embeddings, 4 norms per block (stored as 1 + w), soft-capping, sliding window
        cfg = tf.Gemma2Config(intermediate_size=512, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=None, **common)
        cls = tf.Gemma2ForCausalLM
    elif arch == "phi3longrope":  # Phi-3-mini-128k / Phi-3.5-mini: LongRoPE long/short factors, sliding window
        half = 256 // 4 // 2
        cfg = tf.Phi3Config(intermediate_size=512, original_max_position_embeddings=256, bos_token_id=1,
                            eos_token_id=2, pad_token_id=None, sliding_window=2048,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "long_factor": [round(1.0 + 0.37 * i, 4) for i in range(half)],
                                             "short_factor": [round(1.0 + 0.013 * i, 4) for i in range(half)]},
                            **{**common, "max_position_embeddings": 4096})
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma3mm":  # Gemma 3 4B+: the multimodal checkpoint (text under language_model., a SigLIP tower)
        text = tf.Gemma3TextConfig(intermediate_size=512, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=None, **common)
        vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=511,
                              boi_token_index=509, eoi_token_index=510)
        cls = tf.Gemma3ForConditionalGeneration
    elif arch == "gemma3":  # the text model: q/k norms, local/global rope thetas, sliding window
        cfg = tf.Gemma3TextConfig(intermediate_size=512, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=None, **common)
        cls = tf.Gemma3ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(intermediate_size=768, head_dim=64, tie_word_embeddings=True, bos_token_id=None,
                             **common)
        cls = tf.Qwen3ForCausalLM
    elif arch == "qwen3moe":
        # norm_topk_prob as Qwen3-MoE checkpoints ship it: llama.cpp's qwen3moe graph always renormalizes top-k
        cfg = tf.Qwen3MoeConfig(intermediate_size=768, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=True, head_dim=64, bos_token_id=None, **common)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(arch)
    if arch.startswith("qwen"):
        cfg.eos_token_id = write_bpe(model_dir)
    elif arch.startswith("phi3"):  # Phi-3 style: a smaller SentencePiece model plus special chat tokens above it
        write_sentencepiece(model_dir, vocab_size=500)
        tc = json.loads((model_dir / "tokenizer_config.json").read_text())
        tc["added_tokens_decoder"] = {str(500 + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                     "normalized": False, "single_word": False}
                                      for i, t in enumerate(("<|endoftext|>", "<|assistant|>", "<|end|>"))}
        (model_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    else:  # Gemma's SentencePiece adds no dummy prefix (its GGUF says add_space_prefix = false)
        write_sentencepiece(model_dir, dummy_prefix=not arch.startswith("gemma"))
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random biases so the Qwen2 q/k/v bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, init)
    model.to(torch.float16).save_pretrained(model_dir)
    return model_dir


def hf_logits(model_dir: Path, ids: list[int]):
    """transformers' float32 forward of the saved (float16) weights: logits for every position, as numpy."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()
