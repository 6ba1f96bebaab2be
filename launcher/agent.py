"""`moe-run`: torchrun, returning the job's exit code and saying each failure once.

    python -m launcher.agent --standalone --nproc_per_node=4 -m launcher.train --config FILE ...
    moe-run --standalone --nproc_per_node=4 -m launcher.train --config FILE ...

It takes torchrun's options unchanged and runs torchrun's own agent in this process. What it
adds (`make train`, `make simulate` and slurm/train_torchrun.sbatch use it):
- the job's config is checked once before any worker starts (for launcher.train with a fixed
  world size): a config error is one message and exit code 2, not one per rank followed by
  torchrun's traceback;
- the exit code is the job's (launcher/exit_codes.py), read from the records the workers write
  into MOE_EXIT_DIR, where torchrun turns every failure into 1; a worker's message that differs
  from rank 0's (rank 0 prints its own) is printed, once;
- SIGUSR1 (Slurm's preemption signal) is forwarded to the workers like SIGTERM and SIGINT.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile

from launcher import exit_codes

ENTRY_POINTS = ("launcher.train", "tests.faults")
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _fixed_world(args) -> int | None:
    nnodes = str(args.nnodes).split(":")
    if len(set(nnodes)) != 1 or not nnodes[0].isdigit() or not str(args.nproc_per_node).isdigit():
        return None
    return int(nnodes[0]) * int(args.nproc_per_node)


def precheck(args) -> str | None:
    """A config error of the job, found without starting it (None: none found)."""
    if not (args.module and args.training_script in ENTRY_POINTS):
        return None
    job_args = list(args.training_script_args)
    world = _fixed_world(args)
    if world is None or any(a in ("-h", "--help") for a in job_args):
        return None
    from launcher.config import load_config
    from model.errors import ConfigError

    try:
        load_config(job_args).validate(world)
    except ConfigError as exc:
        return str(exc)
    return None


def signal_option(argv: list[str]) -> list[str]:
    """torchrun's agent dies of SIGUSR1 unless told to handle it (recent torch has the option)."""
    from torch.distributed.run import get_args_parser

    given = any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv)
    if given or "--signals-to-handle" not in get_args_parser()._option_string_actions:
        return []
    return [f"--signals-to-handle={SIGNALS}"]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(signal_option(argv) + argv)
    problem = precheck(args)
    if problem:
        print(f"config error: {problem} (exit code {exit_codes.CONFIG})", file=sys.stderr, flush=True)
        return exit_codes.CONFIG
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        from launcher.env import cpu_threads

        os.environ["OMP_NUM_THREADS"] = str(cpu_threads(int(args.nproc_per_node)))
    # torchrun logs every failure with its own traceback-like table: the summary says it once.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    failures: dict[int, int] = {}
    given = os.environ.get(exit_codes.EXIT_DIR_ENV)  # a batch script collecting every node's
    with tempfile.TemporaryDirectory(prefix="moe-exit-") as scratch:
        folder = given or scratch
        os.environ[exit_codes.EXIT_DIR_ENV] = folder
        try:
            run(args)
        except ChildFailedError as exc:
            failures = {rank: f.exitcode for rank, f in exc.failures.items()}
        except SignalException as exc:
            print(f"moe-run: got {exc.sigval.name}; the workers were asked to stop",
                  file=sys.stderr, flush=True)
        records = exit_codes.read_records(folder)
    local = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else None
    expected = local if _fixed_world(args) == local else None  # one node: every rank is ours
    if given:  # other nodes' ranks write there too: speak for this node's only
        records = {r: rec for r, rec in records.items() if r in failures or rec["host"] == socket.gethostname()}
    return exit_codes.summarize(records, failures, expected)


if __name__ == "__main__":
    sys.exit(main())
