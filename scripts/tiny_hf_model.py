"""Build a tiny random HF MoE model directory of a chosen family, the way a downloaded one
looks: config.json, safetensors (save_pretrained's per-expert keys, or transformers' fused
in-memory layout) and, with --tokenizer bpe, a byte-level BPE tokenizer trained on the Python
standard library's sources. With --tokenizer bytes (the default) the vocabulary is the 256
byte values, which the built-in data (data.source stdlib) trains on directly.

    python scripts/tiny_hf_model.py runs/hf/tiny_qwen2 --family qwen2_moe
    make train ARGS="--checkpoint.init_from=hf:runs/hf/tiny_qwen2 ..."     (docs/hf.md)

The weights are transformers' own random initialisation (seeded); needs `transformers`.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LAYOUTS = ("per_expert", "fused")
EOS = "<|endoftext|>"


def hf_config(family: str, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, experts: int = 8, top_k: int = 2, expert_hidden: int = 64,
              max_seq_len: int = 256, eos_token_id: int | None = None):
    """A transformers config of `family` at these sizes. Qwen2-MoE gets its gated shared
    expert (2 x expert_hidden); dense FFNs, where a family has them, are 2 x expert_hidden."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_seq_len, num_experts_per_tok=top_k,
                  bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None,
                  tie_word_embeddings=False)
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=experts, intermediate_size=expert_hidden)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=experts, intermediate_size=expert_hidden)
    qwen = dict(common, num_experts=experts, moe_intermediate_size=expert_hidden,
                intermediate_size=2 * expert_hidden)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=2 * expert_hidden)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**qwen, head_dim=dim // heads, norm_topk_prob=True)
    raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")


def save(model, out: Path, layout: str = "per_expert", max_shard_size: str = "5GB") -> None:
    """Write `model` to `out` as save_pretrained does (per_expert), or with transformers'
    fused expert tensors as its modules hold them (fused: one model.safetensors)."""
    if layout == "per_expert":
        model.save_pretrained(out, max_shard_size=max_shard_size)
        return
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor in memory; files hold embed_tokens only
        state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def bpe_tokenizer(vocab_size: int, out: Path, max_bytes: int = 4_000_000):
    """A byte-level BPE of `vocab_size` tokens (EOS included) trained on the standard
    library's sources, saved to `out` as transformers' tokenizer files. Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(out)
    return fast


def build(out: Path, family: str, tokenizer: str = "bytes", vocab_size: int = 512,
          layout: str = "per_expert", seed: int = 0, max_shard_size: str = "5GB",
          max_text_bytes: int = 4_000_000, **sizes):
    """Build and write the directory; returns the transformers model."""
    import transformers as tf

    out = Path(out)
    eos = None
    if tokenizer == "bpe":
        fast = bpe_tokenizer(vocab_size, out, max_text_bytes)
        vocab_size, eos = len(fast), fast.eos_token_id
    elif tokenizer == "bytes":
        vocab_size = 256
    else:
        raise ValueError(f"tokenizer {tokenizer!r} is not bytes or bpe")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, vocab_size, eos_token_id=eos, **sizes))
    save(model.eval(), out, layout, max_shard_size)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the directory to write")
    p.add_argument("--family", choices=FAMILIES, default="qwen2_moe")
    p.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes")
    p.add_argument("--vocab-size", type=int, default=512, help="with --tokenizer bpe")
    p.add_argument("--layout", choices=LAYOUTS, default="per_expert")
    p.add_argument("--max-shard-size", default="5GB", help="per_expert: save_pretrained's limit")
    p.add_argument("--seed", type=int, default=0)
    for name, default in (("dim", 64), ("layers", 2), ("heads", 4), ("kv-heads", 2), ("experts", 8),
                          ("top-k", 2), ("expert-hidden", 64), ("max-seq-len", 256)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    if a.out.exists() and any(a.out.iterdir()):
        print(f"{a.out} exists and is not empty", file=sys.stderr)
        return 2
    model = build(a.out, a.family, a.tokenizer, a.vocab_size, a.layout, a.seed, a.max_shard_size,
                  dim=a.dim, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, experts=a.experts,
                  top_k=a.top_k, expert_hidden=a.expert_hidden, max_seq_len=a.max_seq_len)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {a.out}: {a.family}, {params:,} parameters, vocabulary {model.config.vocab_size} "
          f"({a.tokenizer}), experts {a.layout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
