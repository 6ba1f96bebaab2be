"""Per-rank optimizer-state bytes under zero_stage 0, 1, 2 as dp grows, measured from the state.

    python benchmarks/zero_memory.py            # launches torchrun for dp = 1, 2, 4 (CPU, gloo)
    python benchmarks/zero_memory.py --dp 1 2   # a subset

Each launch builds the default model (configs/cpu_tiny.yaml, ep 1), takes one optimizer step
per stage (Adam creates its state lazily) and sums the bytes of every tensor in the AdamW
state of each rank: for ZeRO, the state of DeepSpeed's inner optimizer, which holds only this
rank's partition. Expected: stage 0 keeps the full state on every rank; stages 1 and 2 keep
1/dp of it (plus alignment padding). Stage 2 also partitions gradients, not counted here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the torch optimizer
    return sum(t.numel() * t.element_size() for state in inner.state.values()
               for t in state.values() if hasattr(t, "element_size") and t.dim() > 0)


def worker() -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.env import init_distributed, read_env, shutdown_distributed
    from model.transformer import TransformerLM
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.topology import Topology
    from trainer.optim import build_stepper

    env = read_env()
    job = load_config(["--config", str(ROOT / "configs/cpu_tiny.yaml"), "--parallel.dp=null",
                       "--parallel.ep=1", "--train.micro_batch_size=2", "--train.seq_len=32"])
    layout = job.validate(env.world_size)
    init_distributed(env, "gloo", 300)
    try:
        topology = Topology.create(layout)
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(env.rank))
        rows = []
        for stage in (0, 1, 2):
            torch.manual_seed(0)
            model = TransformerLM(job.model, job.moe)
            apply_expert_parallel(model, topology)
            stepper = build_stepper(model, topology, job.train, stage, env.local_rank)
            stepper.begin(1e-3)
            stepper.backward(stepper.forward(tokens[:, :-1], tokens[:, 1:]).loss)
            stepper.finish()
            stepper.update()
            sizes = torch.tensor([_state_bytes(stepper.optimizer)], dtype=torch.float64)
            gathered = [torch.zeros_like(sizes) for _ in range(env.world_size)]
            dist.all_gather(gathered, sizes)
            params = sum(p.numel() for p in model.parameters())
            rows.append({"dp": layout.dp, "zero_stage": stage, "params": params,
                         "state_bytes_per_rank": [int(g.item()) for g in gathered]})
        if env.rank == 0:
            for row in rows:
                print("RESULT " + json.dumps(row), flush=True)
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
    finally:
        shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    rows = []
    for dp in args.dp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={dp}", __file__]
        print(f"measuring dp={dp} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"dp={dp} failed:\n{proc.stderr[-3000:]}")
        rows += [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    base = {r["dp"]: r["state_bytes_per_rank"][0] for r in rows if r["zero_stage"] == 0}
    print(f"{'dp':>3} {'stage':>5} {'params':>9} {'state MB/rank (max)':>20} {'vs stage 0':>10} {'ideal':>6}")
    for r in rows:
        worst = max(r["state_bytes_per_rank"])
        ideal = 1.0 if r["zero_stage"] == 0 else 1.0 / r["dp"]
        print(f"{r['dp']:>3} {r['zero_stage']:>5} {r['params']:>9} {worst / 1e6:>20.3f} "
              f"{worst / base[r['dp']]:>10.3f} {ideal:>6.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    worker() if "RANK" in os.environ else main()
