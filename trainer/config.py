"""Typed schema of the training loop, the data, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.config import check_recompute
from model.errors import ConfigError, check_choice, check_positive

DATA_SOURCES = ("stdlib", "text", "tokens", "prepared")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation: AdamW, linear warmup then cosine decay, clipping, accumulation."""

    steps: int = 300
    """Optimizer steps to run."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (global batch = dp * micro * accum)."""
    seq_len: int = 128
    """Tokens per sequence (must be <= model.max_seq_len)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 30
    """Linear warmup over this many steps: lr / warmup_steps at the first step, lr at the last."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (norm gains are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_nonfinite_steps: int = 0
    """Steps with a non-finite loss (on any rank) or gradient norm that may be skipped before
    the run stops with exit code 6: a skipped step's update is not applied (parameters,
    optimizer state and expert bias stay as they were), its batch is passed over and it
    counts as a step. 0 = stop at the first. Nothing non-finite is ever saved."""
    seed: int = 1234
    """Seed of the weights and the data order (the same on every rank)."""
    eval_interval: int = 100
    """Evaluate on held-out data every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (bitwise-repeatable runs, slower on GPU)."""
    compile: bool = False
    """torch.compile the dense parts of the model (attention, norms, dense FFNs), in place: all
    blocks share one compiled graph per part, and the state dict keeps its names. The MoE
    layers stay eager (data-dependent dispatch, their own autograd functions, collectives).
    The first step pays the compilation."""
    recompute: str = "none"
    """Activation checkpointing: none; ffn (each block's feed-forward, the norm and the MoE
    layer, runs again in backward: an MoE layer's activations grow with top_k, the attention's
    do not); full (each whole block runs again, keeping only its input). Trades one more
    forward of what is recomputed (with expert parallelism, its all-to-alls too) for memory.
    MFU counts the model's FLOPs only, so recomputing lowers it."""
    precision: str = "auto"
    """Compute dtype: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16. bf16 at zero_stage 0 is
    autocast: fp32 weights, gradients and Adam state, the matmuls, attention and expert GEMMs
    in bf16 (router scores and norms stay fp32). At zero_stage 1 and 2 it is DeepSpeed's bf16
    mode: bf16 weights and gradients, fp32 master weights and Adam state in ZeRO's optimizer.
    At zero_stage 3 it is FSDP's mixed precision: fp32 sharded weights (the master copy) and
    Adam state, bf16 gathered copies for compute, gradients reduced in fp32. Checkpoints hold
    fp32 weights either way."""

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len", "eval_batches"):
            check_positive(f"train.{name}", getattr(self, name))
        if self.lr <= 0:
            raise ConfigError(f"train.lr ({self.lr}) must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        for name in ("warmup_steps", "eval_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"train.weight_decay ({self.weight_decay}) and train.grad_clip "
                f"({self.grad_clip}) must be >= 0"
            )
        check_choice("train.precision", self.precision, PRECISIONS)
        check_recompute(self.recompute)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be in [0, 1)")


@dataclass
class DataConfig:
    """Where tokens come from. Each data-parallel rank reads its own deterministic shard."""

    source: str = "stdlib"
    """stdlib: the running Python's standard-library sources as bytes (vocab 256);
    text: a UTF-8/bytes file or a folder of them (bytes, vocab 256);
    tokens: a pre-tokenized flat binary file read as a numpy memmap;
    prepared: one or several datasets written by moe-prepare-data (see docs/data.md)."""
    path: str | None = None
    """File or folder for source=text, file for source=tokens; for source=prepared a dataset
    directory, or several separated by commas (a mixture, weighted by data.weights)."""
    text_glob: str = "**/*.txt"
    """Files read from a data.path folder when source=text, relative to it. The default reads
    *.txt files only (.md, .rst, .py, ... are not read): set e.g. '**/*.md' or '**/*'."""
    token_dtype: str = "uint16"
    """numpy dtype of a source=tokens file."""
    holdout_fraction: float = 0.05
    """Share of the data held out for evaluation (by file where there are several files).
    source=prepared: fixed when the dataset was prepared (moe-prepare-data --holdout-fraction)."""
    weights: str | None = None
    """source=prepared with several datasets: their mixture weights, comma-separated, one per
    data.path entry and in its order, each > 0 (relative: '3,1' draws 3/4 of the samples from
    the first). Required with several datasets."""
    tokenizer: str | None = None
    """source=prepared: the model's tokenizer (a tokenizer.json, an HF model directory, or
    bytes). Set, every dataset must have been prepared with it (same file hash, vocabulary
    and EOS id). Unset, they must still share one tokenizer."""

    def paths(self) -> list[str]:
        """data.path's entries (several for a prepared mixture)."""
        if not self.path:
            return []
        if self.source != "prepared":
            return [self.path]
        return [p.strip() for p in self.path.split(",") if p.strip()]

    def mixture_weights(self) -> list[float]:
        """data.weights, parsed and checked against data.path (ConfigError naming the values)."""
        paths = self.paths()
        if self.weights is None:
            if len(paths) > 1:
                raise ConfigError(f"data.weights is required with several datasets in data.path "
                                  f"({len(paths)}: {', '.join(paths)}), e.g. --data.weights={','.join(['1'] * len(paths))}")
            return [1.0] * len(paths)
        try:
            weights = [float(w) for w in self.weights.split(",")]
        except ValueError:
            raise ConfigError(f"data.weights ({self.weights!r}) must be numbers separated by commas") from None
        if len(weights) != len(paths):
            raise ConfigError(f"data.weights ({self.weights!r}) has {len(weights)} weight(s), data.path "
                              f"has {len(paths)} dataset(s)")
        for p, w in zip(paths, weights):
            if not (w > 0 and w != float("inf")):
                raise ConfigError(f"data.weights: the weight of {p} ({w}) must be a finite number > 0")
        return weights

    def validate(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source != "stdlib":
            if not self.path:
                raise ConfigError(f"data.path is required when data.source is {self.source!r}")
            for path in self.paths():
                if not Path(path).exists():
                    raise ConfigError(f"data.path ({path}) does not exist")
        if self.source != "prepared":
            for name in ("weights", "tokenizer"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"data.{name} ({getattr(self, name)}) is for data.source=prepared, "
                                      f"not {self.source!r}")
        else:
            self.mixture_weights()
        check_choice("data.token_dtype", self.token_dtype, ("uint8", "uint16", "int32", "uint32", "int64"))
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(
                f"data.holdout_fraction ({self.holdout_fraction}) must be in (0, 1)"
            )


@dataclass
class CheckpointConfig:
    """Sharded, reshardable checkpoints in <run_dir>/checkpoints (see checkpoint/)."""

    interval: int = 0
    """Save every this many steps; 0 = only at the end."""
    save_final: bool = True
    """Save when training ends."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints (the newest is never deleted); 0 keeps all."""
    resume: str | None = None
    """Resume model, optimizer, data position and RNG: a checkpoint directory, a run's
    checkpoints folder (its `latest`), or auto (the newest verified checkpoint of this run,
    a fresh start when there is none). Any parallel layout may load it."""
    accept_data_change: bool = False
    """Resume even though the training data changed since the checkpoint (a file added,
    removed, edited or re-prepared: the data fingerprint in its metadata differs). The run
    continues at the saved sample position of the new data, whose order is not the saved
    run's. Without it such a resume is refused, naming the file."""
    init_from: str | None = None
    """Start from the model weights of this checkpoint (any layout), with a fresh optimizer
    and step 0: fine-tuning. Excludes resume."""

    def validate(self) -> None:
        for name in ("interval", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name} ({getattr(self, name)}) must be >= 0")
        for name in ("resume", "init_from"):
            value = getattr(self, name)
            if value is not None and value != "auto" and not Path(value).is_dir():
                raise ConfigError(f"checkpoint.{name} ({value}) is not a checkpoint directory")
        if self.init_from == "auto":
            raise ConfigError("checkpoint.init_from (auto) must be a path; auto is for resume")
        if self.resume is not None and self.init_from is not None:
            raise ConfigError(f"checkpoint.resume ({self.resume}) and checkpoint.init_from "
                              f"({self.init_from}) exclude each other")


@dataclass
class LoggingConfig:
    """Run directory, progress bar, TensorBoard."""

    run_dir: str = "runs/default"
    """Directory for the resolved config, TensorBoard events and checkpoints. One job at a
    time (a lock), and one run: a run dir that holds one is refused unless the run is
    resumed (checkpoint.resume) or logging.start_over is set."""
    start_over: bool = False
    """Start a new run in a run dir that holds one (committed checkpoints, summary.json or
    TensorBoard events): its files first move to <run_dir>/previous_<time>/, nothing is
    deleted."""
    log_interval: int = 10
    """Write scalars (and refresh the progress bar's numbers) every this many steps."""
    heatmap_interval: int = 50
    """Write the layers x experts load heatmap every this many steps; 0 = never."""
    tensorboard: bool = True
    """Write TensorBoard event files (rank 0)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device, the denominator of MFU (train/mfu, summary.json); 0 = the
    dense bf16 figure of a known GPU (H100, H200: 989; A100: 312), and no MFU on other devices."""

    def validate(self) -> None:
        check_positive("logging.log_interval", self.log_interval)
        if self.peak_tflops < 0:
            raise ConfigError(f"logging.peak_tflops ({self.peak_tflops}) must be >= 0 (0 = auto)")
        if self.heatmap_interval < 0:
            raise ConfigError(
                f"logging.heatmap_interval ({self.heatmap_interval}) must be >= 0"
            )
