"""What one training step of the real trainer holds and sends on a rank, measured, for
tests/distributed/test_planner.py to hold the planner's figures against.

Measured in the step after a warm-up step (Adam's state and DeepSpeed's buffers exist by then):
- parameters: the bytes of their distinct storages (at ZeRO 1-2, DeepSpeed's flat buffers; at
  3, FSDP2's padded shards);
- gradients: what the optimizer step reads, taken as it starts (stages 0 and 3: every .grad,
  at 3 the reduce-scattered shards; stages 1-2: DeepSpeed's averaged_gradients, the
  partition's gradients);
- optimizer state: the AdamW moments (tensors with a dim; the step counters are 0-d), and
  at stages 1-2 DeepSpeed's fp32 partitions (the master weights);
- activations: benchmarks/saved_tensors.saved_tensor_bytes around the step's forward,
  parameters and buffers left out;
- received rows: what the experts' forward got in each forward (the routing of this rank);
- collectives: parallel/collectives.count_collectives (ours) and a c10d-level counter
  (tests/distributed/dist_counter.py: ours and DeepSpeed's) around the whole step.
"""

from __future__ import annotations

import torch

from benchmarks.saved_tensors import saved_tensor_bytes
from parallel.collectives import count_collectives
from planner.hook import run_plan
from tests.distributed.ckpt_setup import make_trainer
from tests.distributed.dist_counter import DistCounter
from trainer.loop import _Window


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (a DTensor's: its local shard's)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: its shard
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _moments(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps torch's AdamW
    return [t for state in inner.state.values() for t in state.values()]


def measure_step(rank: int, run_dir: str, layout: str, extra: tuple[str, ...]) -> dict:
    trainer = make_trainer(rank, run_dir, layout, *extra)
    trainer.train_step(_Window())
    model, stepper = trainer.model, trainer.stepper
    out: dict = {"activations": [], "recv_rows": []}
    counting = [False]

    def count_rows(module, args):
        if counting[0]:
            out["recv_rows"][-1] += args[0].shape[0]

    hooks = [layer.experts.register_forward_pre_hook(count_rows) for layer in model.moe_layers()]
    forward = stepper.forward
    kept = [*model.parameters(), *model.buffers()]

    def measured_forward(x, y):
        counting[0] = True
        out["recv_rows"].append(0)
        try:
            held, result = saved_tensor_bytes(lambda: forward(x, y), kept)
        finally:
            counting[0] = False
        out["activations"].append(held)
        return result

    stepper.forward = measured_forward
    if stepper.zero_stage in (0, 3):
        update = stepper.update

        def measured_update():
            out["grads"] = storage_bytes(p.grad for p in model.parameters())
            update()

        stepper.update = measured_update
    else:
        zero_step = stepper.optimizer.step

        def measured_zero_step(*args, **kwargs):
            grads = stepper.optimizer.averaged_gradients.values()
            out["grads"] = storage_bytes(t for group in grads for t in group)
            return zero_step(*args, **kwargs)

        stepper.optimizer.step = measured_zero_step
    every = DistCounter()
    with count_collectives() as ours, every:
        trainer.train_step(_Window())
    for h in hooks:
        h.remove()
    master = getattr(stepper.optimizer, "single_partition_of_fp32_groups", [])
    return out | {"trainer_plan": run_plan(trainer.job, trainer.topology.layout.world_size, "cpu"), "params": storage_bytes(model.parameters()),
                  "optimizer": storage_bytes(_moments(stepper.optimizer)),
                  "master": storage_bytes(master), "ours": list(ours), "all": every.calls}
