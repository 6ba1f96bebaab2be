"""Simulate an N-node x M-process job on one machine: one torchrun agent per simulated node.

    python -m launcher.simulate --nodes 2 --nproc-per-node 2 -- --config configs/cpu_tiny.yaml
    make simulate NODES=2 PER_NODE=2 ARGS="--train.steps=20"

Each agent runs with its own --node-rank and spawns local ranks 0..M-1, and all of them meet at
one static rendezvous on 127.0.0.1 (standing for the first host of a real allocation), exactly
as `srun torchrun --nnodes=N --node-rank=$SLURM_NODEID ...` does across machines. So the code
that depends on the node (local rank, node rank, hosts, the rendezvous, rank order across
nodes) runs as in a real job; only the network is a loopback. Every output line is prefixed
with its node. SIGINT, SIGTERM and SIGUSR1 are forwarded to every agent (a simulated
preemption). Each agent is launcher.agent (torchrun returning its workers' exit code), and the
job's exit code comes from theirs as from ranks' (launcher/exit_codes.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

from launcher.exit_codes import job_code

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command(node: int, nodes: int, nproc: int, port: int, max_restarts: int,
                  job_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "launcher.agent", f"--nnodes={nodes}",
            f"--node-rank={node}", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={port}", f"--max-restarts={max_restarts}",
            "-m", "launcher.train", *job_args]


def _pump(node: int, stream, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[node {node}] {line}")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="processes per node (default 2)")
    parser.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument("--max-restarts", type=int, default=0, help="passed to every torchrun agent")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then launcher.train arguments")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.nproc_per_node < 1:
        parser.error(f"--nodes ({args.nodes}) and --nproc-per-node ({args.nproc_per_node}) must be >= 1")
    job_args = args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args
    port = args.master_port or free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"simulating {args.nodes} nodes x {args.nproc_per_node} processes, rendezvous "
          f"127.0.0.1:{port}", flush=True)
    lock, agents, pumps = threading.Lock(), [], []
    for node in range(args.nodes):
        cmd = agent_command(node, args.nodes, args.nproc_per_node, port, args.max_restarts, job_args)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        agents.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(node, proc.stdout, lock), daemon=True))
        pumps[-1].start()

    def forward(signum, frame):
        for proc in agents:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        codes = [proc.wait() for proc in agents]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for pump in pumps:
        pump.join(timeout=5)
    print(f"agents exited with {codes}", flush=True)
    return job_code(codes)


if __name__ == "__main__":
    sys.exit(main())
