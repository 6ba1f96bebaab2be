"""Per-rank bytes of parameters, gradients and optimizer state under zero_stage 0-3 as dp grows,
and the peak a training step holds, measured.

    python benchmarks/zero_memory.py              # torchrun for dp = 1, 2, 4 at ep 1 (CPU, gloo)
    python benchmarks/zero_memory.py --dp 4 --ep 2

Each launch builds the default model (configs/cpu_tiny.yaml) at each stage and takes two
optimizer steps (Adam creates its state in the first). Per rank, from the tensors themselves:
  params   bytes of the parameters the model holds (stage 3: FSDP's local shards), dense and
           expert apart;
  grads    bytes of the gradients when backward is done (stage 3: the reduce-scattered
           shards); DeepSpeed (stages 1, 2) keeps them in its own buffers, not counted here;
  optim    bytes of AdamW's state (for ZeRO: DeepSpeed's inner optimizer, its partition only);
  peak     the most bytes live during the second step, from the profiler's record of every
           CPU allocation and free since before the model was built: parameters, gradients,
           optimizer state, every buffer DeepSpeed or FSDP keeps, activations and the gathered
           blocks included.
Expected at stage 3: params, grads and optim of dense parameters 1/dp of stage 0's, of experts
1/edp (edp = dp x tp / ep), plus padding where a tensor does not split evenly. The peak
differs between ranks and runs by a few MB (when buffers are freed); the largest rank is shown.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = (0, 1, 2, 3)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor: its local shard's)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t is not None and t.dim() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    return _bytes(t for state in inner.state.values() for t in state.values() if hasattr(t, "dim"))


def _peak_in(prof, region: str) -> int:
    """The most bytes live inside the record_function `region`, counting every CPU
    allocation and free the profiler saw since it started."""
    events = prof.profiler.kineto_results.events()
    start, end = next((e.start_ns(), e.end_ns()) for e in events if e.name() == region)
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() > end:
            break
        live += e.nbytes()
        if e.start_ns() >= start:
            peak = max(peak, live)
    return peak


def _measure(stage, job, topology, tokens, local_rank) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from model.transformer import TransformerLM
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.fsdp import apply_fully_shard, mixed_precision
    from trainer.optim import build_stepper

    gc.collect()  # the previous stage's model is gone before the profiler starts counting
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = TransformerLM(job.model, job.moe)
        apply_expert_parallel(model, topology)
        if stage == 3:
            apply_fully_shard(model, topology, mixed_precision(torch.float32))
        stepper = build_stepper(model, topology, job.train, stage, local_rank)
        for step in range(2):
            with record_function(f"step{step}"):
                stepper.begin(1e-3)
                stepper.backward(stepper.forward(tokens[:, :-1], tokens[:, 1:]).loss)
                grads = None  # DeepSpeed keeps its gradients in its own buffers
                if stage in (0, 3):
                    grads = {"dense": _bytes(p.grad for p in stepper.dense),
                             "expert": _bytes(p.grad for p in stepper.expert)}
                stepper.finish()
                stepper.update()
    dense, expert = (stepper.dense, stepper.expert) if stage in (0, 3) else _split(model)
    row = {"params": {"dense": _bytes(dense), "expert": _bytes(expert)}, "grads": grads,
           "optim": _state_bytes(stepper.optimizer), "peak": _peak_in(prof, "step1")}
    del stepper, model, prof
    return row


def _split(model):
    from parallel.expert_parallel import split_parameters

    return split_parameters(model)


def worker(ep: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.env import init_distributed, read_env, shutdown_distributed
    from parallel.collectives import all_gather_object
    from parallel.topology import Topology

    env = read_env()
    job = load_config(["--config", str(ROOT / "configs/cpu_tiny.yaml"), "--parallel.dp=null",
                       f"--parallel.ep={ep}", "--train.micro_batch_size=2", "--train.seq_len=32",
                       "--train.grad_accum=1"])
    layout = job.validate(env.world_size)
    init_distributed(env, "gloo", 300)
    try:
        topology = Topology.create(layout)
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(env.rank))
        for stage in STAGES:
            rows = all_gather_object(_measure(stage, job, topology, tokens, env.local_rank))
            if env.rank == 0:
                print("RESULT " + json.dumps({"dp": layout.dp, "ep": ep, "edp": layout.edp,
                                              "zero_stage": stage, "ranks": rows}), flush=True)
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
    finally:
        shutdown_distributed()


def _worst(row, *keys) -> int:
    values = []
    for r in row["ranks"]:
        for key in keys:
            r = r[key] if r is not None else None
        values.append(r)
    return None if None in values else max(values)


def report(rows: list[dict]) -> None:
    """MB per rank (the largest over ranks), and each stage's share of stage 0's."""
    base = {(r["dp"], r["ep"]): r for r in rows if r["zero_stage"] == 0}
    cols = [("params", "dense"), ("params", "expert"), ("grads", "dense"), ("grads", "expert"),
            ("optim",), ("peak",)]
    print(f"{'dp':>3} {'ep':>3} {'stage':>5} " + " ".join(f"{'/'.join(c):>21}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            value, zero = _worst(r, *c), _worst(base[(r["dp"], r["ep"])], *c)
            cells.append(f"{'-':>21}" if value is None else
                         f"{value / 1e6:>12.3f} ({value / zero if zero else 0:>5.3f})")
        print(f"{r['dp']:>3} {r['ep']:>3} {r['zero_stage']:>5} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ep", type=int, default=1, help="expert parallelism (at most dp)")
    args = parser.parse_args()
    rows = []
    for dp in args.dp:
        ep = min(args.ep, dp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={dp}", __file__, "--ep", str(ep)]
        print(f"measuring dp={dp} ep={ep} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"dp={dp} failed:\n{proc.stderr[-3000:]}")
        rows += [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    report(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker(int(sys.argv[sys.argv.index("--ep") + 1]))
    else:
        main()
