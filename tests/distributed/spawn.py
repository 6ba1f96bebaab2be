"""One helper to run a function on N real gloo processes, with a timeout.

    results = run_distributed(fn, world_size=4, args=(...), timeout_s=120)

`fn(rank, world_size, *args)` must be a module-level function: the processes start from a
fork server, not from the test process, so `fn` and `args` travel pickled. The group is
joined through a FileStore in a fresh temporary file, so tests never race for a port. Every
rank's return value comes back in rank order. If any rank raises, the test fails with the
traceback of every failing rank; ranks still running ERROR_GRACE_S after a failure, or at
`timeout_s`, are killed and named, so a hang fails fast.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback

ERROR_GRACE_S = 10.0
# Imported once by the fork server; every rank of every test is forked from it with these
# loaded. A fresh interpreter per rank paid about 7 s of CPU importing them (torch, and
# torch._dynamo, which torch.optim imports on first use), 4 ranks on 2 cores per test. The
# server only imports: no threads, no CUDA, no process group exist in it to be forked.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "model.transformer", "checkpoint.save", "checkpoint.load",
           "parallel.expert_parallel", "parallel.tensor_parallel", "trainer.loop"]


def _child(fn, rank, world_size, store_path, timeout_s, args, results, environ, cwd):
    # The fork server's environment and directory are those of the moment it started: take
    # the calling test's, as a spawned child would.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.chdir(cwd)
    _redirect_output(store_path, rank)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            # Plain pickle to bytes: tensors travel by value. multiprocessing's own pickler
            # would share their memory through the child, which is gone when the parent reads.
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


_OUTPUTS = ((1, "out"), (2, "err"))  # file descriptor, suffix of the rank's file


def _redirect_output(store_path: str, rank: int) -> None:
    """The fork server's stdout and stderr are those of the moment it started, not this
    test's: each rank writes to files that the parent copies to its own (see _replay_output)."""
    for fd, stream in _OUTPUTS:
        target = os.open(f"{store_path}.{stream}{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)


def _replay_output(store_path: str, world_size: int) -> None:
    """Each rank's output, rank after rank, to this process's stdout and stderr (file
    descriptors, so pytest's capfd sees it like the output of a spawned child)."""
    for rank in range(world_size):
        for fd, stream in _OUTPUTS:
            try:
                with open(f"{store_path}.{stream}{rank}", "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            os.write(fd, data)


def _collect(procs, results, world_size: int, timeout_s: float) -> dict[int, tuple[str, object]]:
    outcome: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    error_deadline = None
    while len(outcome) < world_size:
        now = time.monotonic()
        if now > deadline or (error_deadline is not None and now > error_deadline):
            break
        try:
            rank, status, value = results.get(timeout=0.5)
        except queue.Empty:
            if all(p.exitcode is not None for p in procs):
                break  # everyone exited; whoever did not report crashed
            continue
        outcome[rank] = (status, value)
        if status == "error" and error_deadline is None:
            error_deadline = now + ERROR_GRACE_S
    return outcome


def _context():
    """The fork server on machines without CUDA (CI, laptops). Where CUDA is present, fresh
    interpreters, as before: a fork server whose imports had initialised the CUDA driver would
    fork children that cannot use it, and the few GPU tests do not need the speed."""
    import torch

    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0) -> list:
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, store, timeout_s, args, results,
                                                     dict(os.environ), os.getcwd()))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, object]] = {}
        try:
            outcome = _collect(procs, results, world_size, timeout_s)
        finally:
            for r, p in enumerate(procs):
                p.join(timeout=10 if r in outcome else 0)
                if p.is_alive():
                    p.kill()
                    p.join()
            _replay_output(store, world_size)
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if errors or missing:
        lines = []
        if missing:
            lines.append(f"ranks {missing} did not report within {timeout_s:.0f}s, or within "
                         f"{ERROR_GRACE_S:.0f}s of another rank failing (hang or crash); killed")
        raise AssertionError("\n".join(lines + errors))
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]


def _cases(rank, world_size, fn, cases):
    out = {}
    for case in cases:
        try:
            out[case] = ("ok", fn(rank, world_size, *case))
        except Exception:  # noqa: BLE001 - reported by the case's own test
            out[case] = ("error", f"--- rank {rank} ---\n{traceback.format_exc()}")
    return out


def run_cases(fn, world_size: int, cases: list[tuple], timeout_s: float = 300.0) -> dict:
    """Run `fn(rank, world_size, *case)` for every case, one after another, in ONE set of
    `world_size` processes (on 2 cores, process start-up costs more than a small case).
    Returns {case: every rank's result in rank order, or an AssertionError carrying the
    failing ranks' tracebacks}: each test then reports its own case. A case that fails on some ranks only
    can leave the others waiting in a collective; the group's timeout ends that."""
    per_rank = run_distributed(_cases, world_size, (fn, cases), timeout_s=timeout_s)
    out = {}
    for case in cases:
        errors = [r[case][1] for r in per_rank if r[case][0] == "error"]
        out[case] = AssertionError("\n".join(errors)) if errors else [r[case][1] for r in per_rank]
    return out


def case_result(results: dict, case: tuple):
    """A case's result from run_cases, raising its failure in the calling test."""
    value = results[case]
    if isinstance(value, AssertionError):
        raise value
    return value
