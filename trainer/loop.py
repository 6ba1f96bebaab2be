"""The training loop: accumulate, reduce, clip, step; evaluate, log, checkpoint.

One step, as data: each dp rank draws its micro-batches -> forward (MoE layers exchange tokens
inside) -> backward of loss / grad_accum -> dense grads averaged over dp, expert grads summed
over edp / dp -> global-norm clip -> AdamW -> (moe.bias_update_rate) the routers' expert bias
from the global load -> metrics every log_interval. The reduce/clip/step
part is a Stepper (trainer/optim.py): our own at zero_stage 0, DeepSpeed's ZeRO at 1 and 2.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.flops import model_cost
from checkpoint.errors import StorageError, write_failure
from checkpoint.load import load_checkpoint
from checkpoint.reader import Checkpoint
from checkpoint.save import save_checkpoint
from parallel.collectives import all_reduce
from parallel.faults import fault_point
from parallel.topology import Topology
from trainer.data import RankData
from trainer.heatmap import write_load_heatmap
from trainer.metrics import (
    MetricsWriter,
    StepTimer,
    Throughput,
    expert_load_stats,
    peak_flops,
    peak_memory,
)
from trainer.optim import build_stepper, compute_dtype, lr_at, uses_autocast
from trainer.divergence import Diverged, StepCheck, check_step
from trainer.divergence import describe as describe_divergence
from trainer.signals import INTERRUPT, Interrupted, Preempted, StopSignals

@dataclass
class _Window:
    """Sums of this rank's step statistics since the last log (reduced over dp at log time).

    They stay where the model computed them: copying them to the host every micro-batch would
    make the host wait for the GPU to finish each forward before it can queue the backward.
    """

    steps: int = 0
    losses: torch.Tensor | int = 0  # (3,): lm, aux, z
    entropy_L: torch.Tensor | int = 0
    counts_LE: torch.Tensor | int = 0
    dropped_L: torch.Tensor | int = 0
    norm: torch.Tensor | float = float("nan")  # the last applied step's gradient norm

    def add(self, out, accum: int) -> None:
        losses = torch.stack([out.lm_loss, out.aux_loss, out.z_loss]).detach()
        self.losses = self.losses + losses / accum
        self.entropy_L = self.entropy_L + out.router_entropy_L.detach() / accum
        self.counts_LE = self.counts_LE + out.expert_counts_LE.detach()
        self.dropped_L = self.dropped_L + out.dropped_slots_L.detach()

    def merge(self, step: _Window, norm: torch.Tensor) -> None:
        """Add one applied step's sums (a skipped, non-finite step is left out)."""
        self.steps += 1
        self.norm = norm
        self.losses = self.losses + step.losses
        self.entropy_L = self.entropy_L + step.entropy_L
        self.counts_LE = self.counts_LE + step.counts_LE
        self.dropped_L = self.dropped_L + step.dropped_L


class Trainer:
    def __init__(self, job, model, topology: Topology, device: torch.device, data: RankData,
                 local_rank: int = 0):
        self.job, self.cfg, self.model, self.topology = job, job.train, model, topology
        self.device, self.run_dir = device, Path(job.logging.run_dir)
        self.dtype = compute_dtype(self.cfg.precision, device)
        self.stepper = build_stepper(model, topology, self.cfg, job.parallel.zero_stage, local_rank,
                                     self.dtype, job.parallel.fsdp_reduce_every_micro_batch)
        self.autocast_bf16 = uses_autocast(job.parallel.zero_stage, self.dtype)
        self.sampler, self.val = data.sampler, data.val_batches
        self.val_bytes_per_token = data.val_bytes_per_token
        self.corpus = data.corpus
        self.is_main = topology.rank == 0
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main and job.logging.tensorboard)
        self.tokens_per_step = (topology.size("dp") * self.cfg.micro_batch_size
                                * self.cfg.grad_accum * self.cfg.seq_len)
        self.step = 0
        self.samples_per_micro = topology.size("dp") * self.cfg.micro_batch_size
        self.cost = model_cost(job.model, job.moe, self.cfg.seq_len)
        self.peak_flops = peak_flops(device, job.logging.peak_tflops)
        # moe-plan's figures for this run, on rank 0 (the launcher sets them: planner/hook.py);
        # summary.json keeps them beside the measured peak.
        self.plan: dict = {}
        # Data position: global samples seen at step `origin_step` (both 0 unless resumed).
        self.origin_step, self.origin_samples = 0, 0
        self.resumed_from: Path | None = None
        # Where the model came from (an HF directory: checkpoint/hf/hf_dir.py HFDir.record),
        # kept in every checkpoint's meta for export and the tokenizer check.
        self.model_source: dict | None = None
        self.last_saved_step: int | None = None
        self.last_heatmap = 0
        self.history: list[dict] = []  # eval losses
        self.skipped: list[dict] = []  # non-finite steps skipped (train.max_nonfinite_steps)
        self.train_history: list[dict] = []  # train loss at every log step

    def autocast(self):
        """The forward's autocast region: bf16 at zero_stage 0 when computing in bf16, else off."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def precision_label(self) -> str:
        if self.dtype == torch.float32:
            return "fp32"
        if self.autocast_bf16:
            return "bf16 (autocast, fp32 weights)"
        return "bf16 (" + ("FSDP" if self.stepper.zero_stage == 3 else "DeepSpeed") + ", fp32 master)"

    def train_step(self, window: _Window, stop_flag: int = 0) -> StepCheck:
        """One optimizer step, applied only if its loss and gradient norm are finite on every
        rank; `stop_flag` (trainer.signals) is reduced over the world with that check.
        Returns the check; the step counts either way."""
        self.model.train()
        self.stepper.begin(lr_at(self.step, self.cfg))
        counts_LE, bias_rate, step_window = 0, self.job.moe.bias_update_rate, _Window()
        loss = torch.zeros((), device=self.device)
        for micro in range(self.cfg.grad_accum):
            x, y = self.sampler.batch_at(self.samples_seen + micro * self.samples_per_micro)
            with self.autocast():
                out = self.stepper.forward(x.to(self.device), y.to(self.device))
            self.stepper.backward(out.loss)
            fault_point("train.grads_ready", rank=self.topology.rank, step=self.step + 1,
                        model=self.model, micro=micro)
            loss += out.loss.detach()
            step_window.add(out, self.cfg.grad_accum)
            if bias_rate:
                counts_LE = counts_LE + out.expert_counts_LE.detach()
        norm = self.stepper.finish()
        check = check_step(loss, norm, stop_flag)
        if check.finite:
            self.stepper.update()
            window.merge(step_window, norm)
            if bias_rate:
                # The global batch's load: tp partners route the same tokens, so the dp group
                # has every token once. On the device, no host synchronisation.
                counts_LE = counts_LE.to(self.device)
                all_reduce(counts_LE, self.topology.groups["dp"])
                self.model.update_expert_bias(counts_LE, bias_rate)
        else:
            what = describe_divergence(check, self.step + 1, loss, norm)
            self.skipped.append({"step": self.step + 1, "what": what})
            if len(self.skipped) > self.cfg.max_nonfinite_steps:
                raise Diverged(what)
            if self.is_main:
                print(f"warning: {what}: the step is skipped ({len(self.skipped)} of "
                      f"train.max_nonfinite_steps={self.cfg.max_nonfinite_steps})", flush=True)
        self.step += 1
        return check

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out cross-entropy over every dp rank's eval batches (nats/token)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val:
            with self.autocast():
                total += self.model(x.to(self.device), y.to(self.device)).lm_loss
        total /= len(self.val)
        all_reduce(total, self.topology.groups["dp"])
        return total.item() / self.topology.size("dp")

    def bits_per_byte(self, loss: float | None) -> float | None:
        """Held-out loss per UTF-8 byte in bits (token loss x tokens / bytes / ln 2), which
        compares across tokenizers; None when the data's bytes are unknown (a token file) or
        there is no loss (a run stopped before its first evaluation)."""
        bpt = self.val_bytes_per_token
        return loss / math.log(2) / bpt if bpt and loss is not None else None

    def _log(self, window: _Window, throughput: Throughput) -> dict:
        """Reduce the window over dp and write scalars; returns them. Collective."""
        rate = throughput.rate()
        dp_group, dp = self.topology.groups["dp"], self.topology.size("dp")
        losses = (window.losses / window.steps).to(self.device)
        all_reduce(losses, dp_group)
        lm, aux, z = (losses / dp).tolist()
        scalars = {"train/loss": lm, "train/aux_loss": aux, "train/z_loss": z,
                   "train/lr": self.stepper.optimizer.param_groups[0]["lr"], "train/grad_norm": float(window.norm),
                   "train/tokens_per_s": rate}
        if self.peak_flops:
            scalars["train/mfu"] = self.mfu(rate)
        if isinstance(window.counts_LE, torch.Tensor) and window.counts_LE.numel():
            # counts and drops summed over dp: the global load; entropy averaged.
            counts = torch.cat([window.counts_LE, window.dropped_L[:, None]], 1).to(self.device)
            entropy = (window.entropy_L / window.steps).to(self.device)
            all_reduce(counts, dp_group)
            all_reduce(entropy, dp_group)
            counts, dropped = counts[:, :-1].cpu(), counts[:, -1].cpu()
            scalars |= expert_load_stats(counts, entropy.cpu() / dp, dropped)
            if self.job.moe.bias_update_rate:  # the same on every rank: no reduction
                for i, layer in enumerate(self.model.moe_layers()):
                    bias = layer.router.expert_bias
                    scalars[f"moe/layer{i}/expert_bias_spread"] = float(bias.max() - bias.min())
            heat_every = self.job.logging.heatmap_interval
            if heat_every and (self.step - self.last_heatmap >= heat_every or self.step == self.cfg.steps):
                if self.is_main and self.metrics.failure is None:  # rank 0 draws, out of tokens/s
                    blocks = [i for i in range(self.job.model.n_layers) if self.job.moe.is_moe_layer(i)]
                    with throughput.excluded(), self.metrics.guarded("drawing the expert-load heatmap"):
                        write_load_heatmap(self.metrics, self.run_dir, counts, self.step,
                                           window.steps, blocks)
                self.last_heatmap = self.step
        self.metrics.scalars(self.step, scalars)
        return scalars

    def mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: the model's training FLOPs (model/flops.py) per second over
        the peak of every device in the job."""
        return tokens_per_s * self.cost.flops_per_token / (self.topology.layout.world_size * self.peak_flops)

    def _performance(self, timer: StepTimer) -> dict:
        """Steady-state speed, MFU and the peak memory of the busiest rank. Collective."""
        steps, seconds = timer.steady()
        tokens_per_s = steps * self.tokens_per_step / seconds if seconds > 0 else None
        memory, kind = peak_memory(self.device)
        peak = torch.tensor([memory], dtype=torch.int64, device=self.device)
        all_reduce(peak, None, dist.ReduceOp.MAX)
        return {"world_size": self.topology.layout.world_size, "layout": vars(self.topology.layout),
                "device": str(self.device), "precision": self.precision_label(),
                "tokens_per_step": self.tokens_per_step,
                "steady_steps": steps, "step_time_s": seconds / steps if steps else None,
                "train_tokens_per_s": tokens_per_s, "total_params": self.cost.total_params,
                "activated_params": self.cost.activated_params,
                "flops_per_token": self.cost.flops_per_token,
                "peak_tflops_per_device": self.peak_flops / 1e12 if self.peak_flops else None,
                "mfu": self.mfu(tokens_per_s) if self.peak_flops and tokens_per_s else None,
                "peak_memory_bytes": int(peak.item()), "peak_memory_kind": kind,
                "plan": _beside_measured(self.plan, int(peak.item()), kind) if self.plan else None}

    @property
    def samples_seen(self) -> int:
        """Global training samples consumed before the current step."""
        steps = self.step - self.origin_step
        return self.origin_samples + steps * self.cfg.grad_accum * self.samples_per_micro

    def save(self) -> Path:
        """A checkpoint of everything needed to continue, under any layout. Collective."""
        meta = {"step": self.step, "samples_seen": self.samples_seen,
                "tokens_seen": self.samples_seen * self.cfg.seq_len,
                "layout": vars(self.topology.layout), "zero_stage": self.job.parallel.zero_stage,
                "moe_backend": self.job.moe.backend, "config": self.job.to_dict()}
        if self.is_main and self.corpus is not None:  # rank 0 writes the manifest
            meta["data_fingerprint"] = self.corpus.fingerprint
            if self.corpus.tokenizer is not None:
                meta["tokenizer"] = self.corpus.tokenizer.to_json()
        if self.model_source is not None:
            meta["model_source"] = self.model_source
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, self.model, self.stepper,
                               self.topology, meta, self.job.checkpoint.keep_last, self.resumed_from)
        self.last_saved_step = self.step
        return path

    def resume(self, ckpt: Checkpoint) -> dict:
        """Continue from `ckpt` (saved under any layout): weights, optimizer state, step, data
        position (the first unseen global sample), and this rank's RNG state when the world
        size is unchanged. Collective."""
        meta = load_checkpoint(ckpt, self.model, self.stepper, self.topology)
        self.step = self.origin_step = self.last_saved_step = meta["step"]
        self.origin_samples = meta["samples_seen"]
        self.resumed_from = ckpt.path
        self.model_source = meta.get("model_source")
        if self.is_main:
            rng = ("restored" if meta["rng_restored"] else
                   f"not restored (saved by {meta['layout']['world_size']} ranks, now "
                   f"{self.topology.layout.world_size}): the seeded state of this run is kept")
            print(f"resumed from {ckpt.path}: step {self.step}, {self.origin_samples} samples "
                  f"seen; saved at layout {meta['layout']}, zero_stage {meta['zero_stage']}; "
                  f"RNG {rng}", flush=True)
        return meta

    def fit(self) -> dict:
        """Train to cfg.steps. On SIGTERM/SIGUSR1 (or SIGINT) to any rank, every rank stops at
        the same step, saves a checkpoint and raises Preempted (Interrupted) after writing
        summary.json. A non-finite step beyond train.max_nonfinite_steps raises Diverged with
        nothing saved: the last checkpoint is the last finite state."""
        signals = StopSignals()
        try:  # the handlers stay until the final checkpoint is written: they only set a flag
            return self._fit(signals)
        finally:
            signals.restore()

    def _fit(self, signals: StopSignals) -> dict:
        cfg, log_cfg, ck = self.cfg, self.job.logging, self.job.checkpoint
        bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True,
                   disable=not (self.is_main and log_cfg.progress), desc="train", unit="step")
        throughput, window, timer = Throughput(), _Window(), StepTimer()
        start, eval_loss, scalars, stop, diverged = time.perf_counter(), None, {}, 0, None
        try:
            while self.step < cfg.steps:
                began = time.perf_counter()
                stop = self.train_step(window, signals.flag).stop
                # On a GPU the step is only queued by now: wait for it, or the step time (and
                # the MFU made from it) would count the launches, not the work.
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timer.add(time.perf_counter() - began)
                throughput.update(self.tokens_per_step)
                bar.update(1)
                last = self.step == cfg.steps
                if (self.step % log_cfg.log_interval == 0 or last) and window.steps:
                    scalars = self._log(window, throughput)
                    entry = {"step": self.step, "loss": scalars["train/loss"]}
                    if "moe/max_over_mean" in scalars:  # the window's load imbalance
                        entry["max_over_mean"] = scalars["moe/max_over_mean"]
                    self.train_history.append(entry)
                    window = _Window()
                    bar.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                    tok_s=f"{scalars['train/tokens_per_s']:.0f}")
                with throughput.excluded():  # the logged tokens/s and MFU are training's alone
                    if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                        eval_loss = self.evaluate()
                        entry = {"loss": eval_loss, "bpb": self.bits_per_byte(eval_loss)}
                        entry = {k: v for k, v in entry.items() if v is not None}
                        self.metrics.scalars(self.step, {f"eval/{k}": v for k, v in entry.items()})
                        self.history.append({"step": self.step} | {f"eval_{k}": v for k, v in entry.items()})
                        if self.is_main:
                            bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
                    if ck.interval and self.step % ck.interval == 0 and not (last and ck.save_final):
                        self.save()
                fault_point("train.step_done", rank=self.topology.rank, step=self.step)
                if stop and not last:
                    break
        except Diverged as exc:
            diverged = str(exc)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        summary = {"steps": self.step, "start_step": self.origin_step,
                   "steps_run": self.step - self.origin_step, "final_eval_loss": eval_loss,
                   "final_eval_bpb": self.bits_per_byte(eval_loss),
                   "final_train_loss": scalars.get("train/loss"), "elapsed_s": elapsed,
                   "tokens_per_s": (self.step - self.origin_step) * self.tokens_per_step / elapsed,
                   "evals": self.history, "train": self.train_history,
                   "skipped_steps": self.skipped} | self._performance(timer)
        stopped = None if diverged or not stop or self.step == cfg.steps else (
            f"{signals.received or 'another rank'}'s stop signal at step {self.step}")
        if not diverged and (ck.save_final or stopped) and self.step > (self.last_saved_step or 0):
            saving = time.perf_counter()
            summary["checkpoint"] = str(self.save())
            summary["save_s"] = time.perf_counter() - saving
        if stopped:
            summary["stopped"] = stopped
        if diverged:
            summary["diverged"] = diverged
            summary["last_checkpoint"] = self.last_saved_step
        if self.is_main:
            write_summary(self.run_dir / "summary.json", summary)
        self.metrics.close()
        if diverged:
            where = (f"the last checkpoint, of step {self.last_saved_step}, is from before it"
                     if self.last_saved_step else "no checkpoint was saved")
            raise Diverged(f"{diverged}; {where}")
        if stopped:
            kind = Interrupted if stop == INTERRUPT else Preempted
            raise kind(f"stopped on {stopped}; checkpoint of step {self.last_saved_step} saved "
                       f"({summary.get('save_s', 0.0):.1f} s)")
        return summary


def _beside_measured(plan: dict, measured_peak: int, kind: str) -> dict:
    """The predicted peak beside the measured one. On CPU the measured figure is the process's
    resident set (interpreter and libraries included), so the ratio only means something on
    CUDA."""
    if "unavailable" in plan:
        return plan
    return plan | {"measured_peak_memory_bytes": measured_peak, "measured_kind": kind,
                   "measured_over_predicted": measured_peak / plan["peak_memory_bytes"]
                   if kind == "cuda_max_allocated" else None}


def write_summary(path: Path, summary: dict) -> None:
    """summary.json as strict JSON (a non-finite number becomes null), written atomically."""
    text = json.dumps(_finite(summary), indent=2, allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(write_failure(path, exc)) from None


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
