"""`moe-generate SOURCE --prompt TEXT`: text sampled from a checkpoint or an HF directory.

SOURCE is an HF directory (it has a config.json) or one of our checkpoints (a checkpoint
directory, a run's checkpoints folder or a run directory, any layout). One process, CPU or
GPU, a KV cache (model/kv_cache.py); greedy by default, or sampled (--temperature, --top-k,
--top-p, --seed: model/sampling.py). Text goes through the model's tokenizer (HF
`tokenizers`: the directory's tokenizer.json, the one the run started from, or --tokenizer);
without one, a model of at least 256 tokens is byte-level: token i is byte i.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from checkpoint.hf.export import configs_of, open_run_checkpoint
from checkpoint.hf.hf_dir import is_hf_dir
from checkpoint.hf.start import load_hf_model
from checkpoint.load import load_weights
from launcher import exit_codes
from launcher.config import GROUPED_MM_ALIGN
from model.config import DEEPSPEED_ONLY, MoEConfig
from model.errors import ConfigError
from model.kv_cache import generate
from model.sampling import sampler
from model.transformer import TransformerLM


class Codec:
    """Text <-> token ids: a tokenizer.json (HF `tokenizers`), else bytes."""

    def __init__(self, tokenizer: Path | None, vocab_size: int):
        self.tokenizer, self.vocab_size = None, vocab_size
        if tokenizer is not None:
            from tokenizers import Tokenizer

            file = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
            if not file.is_file():
                raise ConfigError(f"tokenizer {file} does not exist")
            self.tokenizer = Tokenizer.from_file(str(file))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text).ids
        if self.vocab_size < 256:
            raise ConfigError(f"the model has {self.vocab_size} tokens and no tokenizer: give "
                              "--tokenizer, or the prompt as --prompt-ids")
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_model(source: str) -> tuple[TransformerLM, Path | None, int | None]:
    """The model of `source` in this process, on the CPU in fp32; the directory of its
    tokenizer (None if it has none) and its end-of-sequence id (None if unknown)."""
    if is_hf_dir(source):
        model, hf = load_hf_model(source, _run_settings)
        tokenizer = hf.path if "tokenizer.json" in hf.tokenizer_files else None
        return model, tokenizer, hf.config.get("eos_token_id")
    ckpt = open_run_checkpoint(source)
    model_cfg, moe_cfg = configs_of(ckpt)
    model = TransformerLM(model_cfg, dataclasses.replace(moe_cfg, **_run_settings(model_cfg, moe_cfg)))
    load_weights(ckpt, model)
    origin = ckpt.meta.get("model_source") or {}
    tokenizer = Path(origin["hf_dir"]) if "tokenizer.json" in origin.get("tokenizer_files", []) else None
    return model, tokenizer, origin.get("token_ids", {}).get("eos_token_id")


def _run_settings(model_cfg, moe_cfg) -> dict:
    """The native backend (every checkpoint's weights are its canonical ones; dropless, so
    DeepSpeed's capacity settings go back to their defaults); grouped GEMMs where the shapes
    allow them."""
    aligned = not (model_cfg.dim % GROUPED_MM_ALIGN or moe_cfg.expert_hidden % GROUPED_MM_ALIGN)
    return {"backend": "native", "expert_impl": "grouped_mm" if aligned else "loop",
            **{name: getattr(MoEConfig, name) for name in DEEPSPEED_ONLY}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-generate", description=__doc__.split("\n")[0])
    p.add_argument("source", help="HF directory, checkpoint directory, checkpoints folder or run directory")
    p.add_argument("--prompt", default=None, help="the text to continue")
    p.add_argument("--prompt-ids", default=None, help="the prompt as token ids: 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of this mass")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json, or a directory holding one")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--ids", action="store_true", help="print token ids (one JSON list per sample), not text")
    return p


def run(args: argparse.Namespace) -> list[str]:
    """The lines to print: one per sample."""
    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give the prompt as --prompt TEXT or as --prompt-ids 1,2,3 (one of them)")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError(f"--max-new-tokens ({args.max_new_tokens}) and --num-samples "
                          f"({args.num_samples}) must be >= 1")
    model, tokenizer, eos = load_model(args.source)
    codec = Codec(Path(args.tokenizer) if args.tokenizer else tokenizer, model.cfg.vocab_size)
    prompt = ([int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids is not None
              else codec.encode(args.prompt))
    bad = [t for t in prompt if not 0 <= t < model.cfg.vocab_size]
    if not prompt or bad:
        raise ConfigError(f"the prompt's token ids {bad or prompt} must be 1 or more ids in "
                          f"[0, {model.cfg.vocab_size})")
    if len(prompt) + args.max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(f"the prompt ({len(prompt)} tokens) and --max-new-tokens "
                          f"({args.max_new_tokens}) exceed model.max_seq_len ({model.cfg.max_seq_len})")
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    generator = torch.Generator(device).manual_seed(args.seed)
    pick = sampler(args.temperature, args.top_k, args.top_p, generator)
    prompt_BS = torch.tensor([prompt] * args.num_samples, device=device)
    out_BS = generate(model, prompt_BS, args.max_new_tokens, pick, None if args.ignore_eos else eos)
    lines = []
    for row in out_BS.tolist():
        new = row[len(prompt):]
        if eos is not None and not args.ignore_eos and eos in new:
            new = new[: new.index(eos) + 1]
        ids = row[: len(prompt)] + new
        lines.append(json.dumps(ids) if args.ids else codec.decode(ids))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        lines = run(args)
    except Exception as exc:  # noqa: BLE001 - every failure gets its exit code
        return exit_codes.tool_failure("moe-generate", exc)
    separator = "\n" if args.ids else "\n" + "-" * 40 + "\n"
    print(separator.join(lines))
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
