"""What must agree between a checkpoint and the run that loads it, checked before any
collective (every rank reads the same manifest, so every rank raises the same error).

- The model: every field of model.config.ARCHITECTURE (those that fix parameter shapes).
- Resuming (not init_from): what orders the training samples (DATA_ORDER), since the saved
  data position (global samples seen) points into that order, and the data itself (its
  fingerprint: every file's size and sampled hash, trainer/data/fingerprint.py) unless
  checkpoint.accept_data_change; and whether the routers keep an expert bias.
- Resuming or starting from it: the tokenizer the checkpoint's model was trained with, where
  both sides record one (a token id means another piece of text under another tokenizer).
"""

from __future__ import annotations

from checkpoint.errors import CheckpointError
from checkpoint.reader import Checkpoint
from model.config import ARCHITECTURE

# What fixes the order of the training samples (trainer/data.py): a resumed run must keep it.
# (micro_batch_size, grad_accum and dp may change: the position is counted in samples.)
DATA_ORDER = {"train": ("seq_len", "seed"),
              "data": ("source", "text_glob", "token_dtype", "holdout_fraction", "weights")}
# data.path too, for checkpoints without a fingerprint (a fingerprint lets the data move).
DATA_ORDER_BEFORE_FINGERPRINTS = {"data": ("path",)}


def first_difference(saved: dict, job, fields: dict, default_ours: bool):
    """(section.key, checkpoint's value, ours) for the first of `fields` that differ, or None.
    A key the checkpoint lacks (older checkpoints did not record it) counts as ours with
    `default_ours`, else as the field's default (which reproduces what came before it, e.g.
    moe.shared_expert_hidden 0)."""
    for section, keys in fields.items():
        ours = getattr(job, section)
        for key in keys:
            missing = getattr(ours, key) if default_ours else getattr(type(ours), key, None)
            theirs = saved.get(section, {}).get(key, missing)
            if theirs != getattr(ours, key):
                return f"{section}.{key}", theirs, getattr(ours, key)
    return None


def check_compatible(ckpt: Checkpoint, job, data=None) -> None:
    """The checkpoint's model must be this run's model; a resumed run must also read the same
    data in the same order, or its saved data position would point elsewhere. `data` (the
    run's Corpus: .tokenizer, .changed_since) adds the checks of the data itself."""
    saved = ckpt.meta.get("config", {})
    diff = first_difference(saved, job, ARCHITECTURE, default_ours=False)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run: {diff[0]} is "
                              f"{diff[1]} in the checkpoint and {diff[2]} here")
    if data is not None:
        check_tokenizer(ckpt, data)
    if not job.checkpoint.resume:
        return
    moe = saved.get("moe", {})
    theirs = bool(moe.get("expert_bias", False)) or moe.get("bias_update_rate", 0.0) > 0
    if theirs != job.moe.has_expert_bias:
        # The rate may change; the bias must not appear or vanish in a resumed run (init_from
        # may: a new bias starts at zero, an unused one is reported by load_weights).
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: the routers keep an expert bias in the checkpoint "
            f"(moe.expert_bias {moe.get('expert_bias', False)}, moe.bias_update_rate "
            f"{moe.get('bias_update_rate', 0.0)}) and {'do not' if theirs else 'do'} here "
            f"(moe.expert_bias {job.moe.expert_bias}, moe.bias_update_rate "
            f"{job.moe.bias_update_rate}), so the bias would "
            + ("be dropped (its routing would change)" if theirs else "be missing from it")
            + f"; --checkpoint.init_from={ckpt.path} starts from its weights instead")
    order = DATA_ORDER if "data_fingerprint" in ckpt.meta else DATA_ORDER | {
        "data": DATA_ORDER["data"] + DATA_ORDER_BEFORE_FINGERPRINTS["data"]}
    diff = first_difference(saved, job, order, default_ours=True)
    if diff:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: {diff[0]} is {diff[1]} in the checkpoint and "
            f"{diff[2]} here, which changes the order of the training samples, so its data "
            f"position ({ckpt.meta.get('samples_seen')} samples seen) would not continue the "
            f"run. Keep the value, or start from its weights with --checkpoint.init_from="
            f"{ckpt.path} (fresh optimizer, step 0)")
    if data is not None and not job.checkpoint.accept_data_change:
        changed = data.changed_since(ckpt.meta.get("data_fingerprint"))
        if changed:
            raise CheckpointError(
                f"cannot resume from {ckpt.path}: the training data changed since it was saved "
                f"({changed}), so its data position ({ckpt.meta.get('samples_seen')} samples "
                "seen) would not continue the run's sample order. Restore the data, or resume "
                "anyway with --checkpoint.accept_data_change=true")


def check_tokenizer(ckpt: Checkpoint, data) -> None:
    """The tokenizer of the checkpoint's training data and of this run's must be one, where
    both are known (older checkpoints, and token files, do not say)."""
    theirs = ckpt.meta.get("tokenizer")
    ours = data.tokenizer.to_json() if data.tokenizer is not None else None
    if theirs is None or ours is None or theirs == ours:
        return
    raise CheckpointError(
        f"checkpoint {ckpt.path} was trained on data of another tokenizer ({_describe(theirs)}) "
        f"than this run's ({_describe(ours)}): its token ids would mean other text. Prepare the "
        "data with the checkpoint's tokenizer (moe-prepare-data --tokenizer)")


def _describe(tokenizer: dict) -> str:
    if tokenizer.get("kind") == "bytes":
        return "bytes"
    return (f"tokenizer.json sha256 {str(tokenizer.get('sha256'))[:12]}, vocabulary "
            f"{tokenizer.get('vocab_size')}, EOS {tokenizer.get('eos_id')}")
