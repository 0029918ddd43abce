"""Train quantgate's bundled reference model: a small Llama (GQA) with a SentencePiece tokenizer, saved as F16.

Deterministic (seeded data order and init, 2 threads), budgeted by wall time: training stops at --max-steps or
--time-limit-min, whichever comes first, then the model is evaluated on data/eval.jsonl and written with its model card.

    .venv/bin/python scripts/train_reference_model.py --out models/reference
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_datasets as bd  # noqa: E402  (after the sys.path insert)

REPO = Path(__file__).resolve().parents[1]
BOS, EOS = 1, 2
PROMPTS = ["def fibonacci(n):\n", "User: How do I reverse a list called names in Python?\nAssistant:",
           "Solve 3x + 5 = 20.\nStep 1:",
           "Problem: A train travels at 60 km per hour for 3 hours. How far does it go?\n",
           "import os\nimport sys\n\n\ndef main():\n"]


def train_tokenizer(docs: list[tuple[str, str, str]], prefix: Path, vocab_size: int) -> None:
    """Train a Llama-style BPE SentencePiece model (byte fallback, identity normalization) on the training lines."""
    import sentencepiece as spm

    lines = [ln for _, _, text in docs for ln in text.split("\n") if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9999, input_sentence_size=len(lines) + 1,
        shuffle_input_sentence=False, num_threads=1, max_sentence_length=8192, minloglevel=2)


def token_stream(docs: list[tuple[str, str, str]], sp, seed: int) -> torch.Tensor:
    """All training documents as one token stream: <s> doc </s>, documents in a seeded random order."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    ids: list[int] = []
    for i in order:
        ids += [BOS] + sp.encode(docs[i][2]) + [EOS]
    return torch.tensor(ids, dtype=torch.long)


def make_model(vocab: int, args: argparse.Namespace):
    """A LlamaForCausalLM with GQA; every weight row length is a multiple of 256 (K-quants apply everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_pos, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=None, attention_bias=False, mlp_bias=False, hidden_act="silu")
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def eval_ppl(model, sp, samples: list[bd.Sample], max_len: int) -> dict[str, dict[str, float]]:
    """Token-level perplexity per category and overall: sum of NLL over all predicted tokens / their count."""
    model.eval()
    acc: dict[str, list[float]] = {}
    for s in samples:
        ids = torch.tensor([([BOS] + sp.encode(s.text))[:max_len]], dtype=torch.long)
        logits = model(ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        for key in (s.category, "overall"):
            a = acc.setdefault(key, [0.0, 0])
            a[0] += nll
            a[1] += ids.shape[1] - 1
    return {k: {"ppl": math.exp(v[0] / v[1]), "tokens": v[1], "nll_per_token": v[0] / v[1]} for k, v in acc.items()}


@torch.no_grad()
def generations(model, sp, n_new: int) -> list[dict[str, str]]:
    """Greedy continuations of a few fixed prompts."""
    model.eval()
    out = []
    for p in PROMPTS:
        ids = torch.tensor([[BOS] + sp.encode(p)])
        gen = model.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        full = sp.decode(gen[0].tolist())  # decode whole: decoding the tail alone drops its leading space
        out.append({"prompt": p, "completion": full[len(sp.decode(ids[0].tolist())):]})
    return out


def save_tokenizer(out: Path, spm_path: Path) -> None:
    """Write tokenizer.model plus the transformers files (tokenizer.json, tokenizer_config.json)."""
    from transformers import LlamaTokenizer

    shutil.copy(spm_path, out / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False, legacy=True)
    tok.save_pretrained(str(out))


def plot_loss(log: list[dict], path: Path) -> None:
    """Loss curve (train loss per logged step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("reference model training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_manifest(corpus: bd.Corpus, path: Path) -> None:
    """Per-document sha256 of the training text, training/held-out file names and training unit hashes."""
    man = {"description": "what the reference model was trained on; see data/README.md",
           "documents": [{"category": c, "source": s, "sha256": bd.sha256_text(t), "chars": len(t)}
                         for c, s, t in corpus.train_docs],
           "train_code_files": corpus.train_code_files, "held_out_code_files": corpus.held_out_code_files,
           "unit_key": "sha256(whitespace-normalized unit)[:16]; units are blank-line separated",
           "train_unit_hashes": corpus.train_unit_hashes}
    path.write_text(json.dumps(man, indent=0) + "\n", encoding="utf-8")


def finalize_config(out: Path) -> None:
    """Also record the dtype under the pre-v5 key `torch_dtype`, which older converters and loaders read."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["torch_dtype"] = "float16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def refresh_generations(out: Path) -> None:
    """Recompute the greedy generations from the saved F16 folder and store them in train_log.json."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    log_path = out / "train_log.json"
    log = json.loads(log_path.read_text(encoding="utf-8"))
    log["generations"] = generations(model, sp, 60)
    log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")


def write_card(out: Path) -> None:
    """Render the model card README.md from train_log.json and config.json (every number is read, not typed)."""
    log = json.loads((out / "train_log.json").read_text(encoding="utf-8"))
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    a = log["args"]
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    total_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6

    def ppl_rows(key: str) -> str:
        return "\n".join(f"| {c} | {log['eval_ppl_float32'][c]['ppl']:.2f} | {log[key][c]['ppl']:.2f} | "
                         f"{log['eval_ppl_float32'][c]['tokens']} |" for c in ("code", "chat", "math", "overall"))

    gens = "\n\n".join(f"Prompt:\n```\n{g['prompt']}\n```\nGreedy continuation (60 tokens):\n```\n"
                        f"{g['completion']}\n```" for g in log["generations"])
    (out / "README.md").write_text(f"""---
license: mit
language: en
library_name: transformers
pipeline_tag: text-generation
---
# quantgate reference model (tiny Llama, F16)

A small, genuinely trained Llama-architecture causal LM bundled with quantgate so that quantization, GGUF export and
quality checks run on a real model offline. It is a test fixture, not a useful assistant.

## Architecture

| | |
| --- | --- |
| class | `LlamaForCausalLM` (transformers {cfg.get('transformers_version')}) |
| parameters | {log['parameters']:,} |
| layers | {cfg['num_hidden_layers']} |
| hidden size | {cfg['hidden_size']} |
| intermediate (SwiGLU) size | {cfg['intermediate_size']} |
| attention heads / KV heads (GQA) | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} (head dim {cfg['head_dim']}) |
| vocabulary | {cfg['vocab_size']} |
| max positions | {cfg['max_position_embeddings']} (RoPE theta {cfg['rope_parameters']['rope_theta']:g}) |
| RMSNorm eps | {cfg['rms_norm_eps']} |
| tied embeddings | {cfg['tie_word_embeddings']} (separate `lm_head.weight`) |
| weights | `model.safetensors`, every tensor F16 ({size_mb:.2f} MB; folder {total_mb:.2f} MB) |

Every 2-D weight has a row length (last dimension) that is a multiple of 256 (256 or 768), so every K-quant applies
to every weight matrix.

## Tokenizer

SentencePiece BPE (`tokenizer.model`), vocabulary {cfg['vocab_size']}, trained on the training text only, Llama-2
style: ids `<unk>`=0, `<s>`=1 (BOS, prepended), `</s>`=2 (EOS), no pad token; pieces 3-258 are the 256 byte-fallback
tokens `<0x00>`..`<0xFF>`; `byte_fallback=True`, `split_digits=True`, identity normalization,
`remove_extra_whitespaces=False`, `add_dummy_prefix=True` (a leading "▁" is added), whitespace-only pieces allowed
(indentation such as "▁▁▁▁" is one token). Newlines have no piece of their own and are encoded as `<0x0A>`.
`tokenizer.json` / `tokenizer_config.json` let `AutoTokenizer.from_pretrained` load it (`LlamaTokenizer`); it gives
the same ids as SentencePiece except for text that starts with whitespace, where transformers' Metaspace
pre-tokenizer skips the dummy prefix (SentencePiece and llama.cpp add it).

## Training data

Built by `scripts/build_datasets.py` (see `data/README.md`): CPython 3.11.7 standard-library modules (PSF-2.0;
{len(json.loads((out / 'train_manifest.json').read_text())['train_code_files'])} training files, whole files held
out for eval/calibration), procedurally generated math with worked answers and template-generated user/assistant
dialogues (both generated by this project, MIT). The training corpus is {log['corpus_tokens']:,} tokens; the sha256 of
every training document is in `train_manifest.json`. `data/calibration.jsonl` and `data/eval.jsonl` are disjoint from
it and from each other.

## Training

```
{log['command']}
```

Seed {a['seed']} (`torch.manual_seed`, seeded document order and batch order), {a['threads']} CPU threads, torch
{log['torch']}. AdamW (lr {a['lr']:g}, betas 0.9/0.95, weight decay 0.1), linear warmup {a['warmup']} steps then cosine
decay to 10% over whichever budget ends first, {a['max_steps']} steps or {a['time_limit_min']:g} minutes of wall
time; batch {a['batch']} x {a['seq_len']} tokens, gradient clipping 1.0, float32.

| | |
| --- | --- |
| steps | {log['steps']} (stopped by {log['stop_reason']}) |
| tokens seen | {log['tokens_seen']:,} |
| training wall time | {log['train_wall_s'] / 60:.1f} min (whole script {log['total_wall_s'] / 60:.1f} min) |
| final train loss (last log / mean of last 10 logs) | {log['final_train_loss']:.3f} / {log['final_train_loss_mean_last_10_logs']:.3f} nats/token |

![loss curve](loss_curve.png) (per-step losses in `train_log.json`)

## Held-out perplexity (data/eval.jsonl, 100 samples)

Token-level: BOS + SentencePiece ids, each sample scored in one window, exp(total NLL / predicted tokens).

| category | ppl, float32 weights | ppl, weights cast to F16 and back | tokens |
| --- | --- | --- | --- |
{ppl_rows('eval_ppl_f16_roundtrip')}

(The float32 column is the model before the final cast; the shipped weights are the F16 column.)

## Greedy generations (shipped F16 weights)

{gens}

## Limitations

About five million parameters trained for half an hour on two CPU cores: it has learned Python's surface syntax, the
dialogue format and the arithmetic templates, not reasoning. Templated chat and math are nearly memorized (perplexity
close to 1-3), while unseen standard-library modules stay hard (code perplexity is by far the highest). Use it to test
tooling (quantization error, perplexity deltas, GGUF export), never to judge quality of text.
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, train tokenizer and model, evaluate, and write models/reference/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-pos", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--time-limit-min", type=float, default=27.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--card-only", action="store_true", help="only re-render README.md from train_log.json")
    args = ap.parse_args(argv)
    if args.card_only:
        finalize_config(args.out)
        refresh_generations(args.out)
        write_card(args.out)
        return 0

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = bd.build()
    bd.check(corpus)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    train_tokenizer(corpus.train_docs, work / "tokenizer", args.vocab)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer.model"))
    stream = token_stream(corpus.train_docs, sp, args.seed)
    n_seq = (len(stream) - 1) // args.seq_len
    print(f"corpus: {len(corpus.train_docs)} docs, {len(stream)} tokens, {n_seq} sequences of {args.seq_len}",
          flush=True)

    model = make_model(sp.get_piece_size(), args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)

    def lr_at(step: int, elapsed_s: float) -> float:
        # linear warmup, then cosine to 10% over whichever budget (steps or wall time) runs out first
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = max((step - args.warmup) / max(1, args.max_steps - args.warmup), elapsed_s / (60 * args.time_limit_min))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    gen = torch.Generator().manual_seed(args.seed + 1)
    perm, pos, log, step, tokens_seen = torch.randperm(n_seq, generator=gen), 0, [], 0, 0
    t_train = time.time()
    stop_reason = "max_steps"
    model.train()
    while step < args.max_steps:
        if (time.time() - t_train) / 60 > args.time_limit_min:
            stop_reason = "time_limit"
            break
        if pos + args.batch > n_seq:
            perm, pos = torch.randperm(n_seq, generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        starts = idx * args.seq_len
        batch = torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()])
        lr = lr_at(step, time.time() - t_train)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "tokens": tokens_seen,
                   "elapsed_s": round(time.time() - t_train, 1)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    train_s = time.time() - t_train

    evals = corpus.eval
    ppl32 = eval_ppl(model, sp, evals, args.max_pos)
    model = model.to(torch.float16)
    model_rt = make_model(sp.get_piece_size(), args)
    model_rt.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ppl16 = eval_ppl(model_rt, sp, evals, args.max_pos)
    gens = generations(model_rt, sp, 60)
    print("ppl f32", json.dumps(ppl32), "\nppl f16", json.dumps(ppl16), flush=True)

    model.config.dtype = torch.float16
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = BOS, EOS
    model.save_pretrained(str(out))
    finalize_config(out)
    save_tokenizer(out, work / "tokenizer.model")
    shutil.rmtree(work)
    write_manifest(corpus, out / "train_manifest.json")
    plot_loss(log, out / "loss_curve.png")
    cmd = "python scripts/train_reference_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"command": cmd.strip(), "args": args_json,
               "parameters": n_params, "steps": step, "tokens_seen": tokens_seen, "stop_reason": stop_reason,
               "train_wall_s": round(train_s, 1), "total_wall_s": round(time.time() - t0, 1),
               "corpus_tokens": len(stream), "final_train_loss": log[-1]["loss"] if log else None,
               "final_train_loss_mean_last_10_logs": sum(r["loss"] for r in log[-10:]) / max(1, len(log[-10:])),
               "eval_ppl_float32": ppl32, "eval_ppl_f16_roundtrip": ppl16, "generations": gens,
               "torch": torch.__version__, "python": platform.python_version(), "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    write_card(out)
    print(f"done: {step} steps, {tokens_seen} tokens, {train_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
