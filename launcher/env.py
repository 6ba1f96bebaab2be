"""How this process was launched: rank, world and rendezvous address, read from the environment.

Reading is kept apart from joining (``init_distributed``) so a configuration can be checked
against the world size before any collective exists; a bad launch then fails at once with a
ConfigError on every rank instead of hanging in a rendezvous. ``read_env`` and the hostlist
helpers are pure functions of their inputs so tests can pass a dict.
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from model.errors import ConfigError, check_choice

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT")
NOMINAL_PORT = 29500  # a world of one never opens a socket; this is only a value to report


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; ``launcher`` is "torchrun", "slurm" or "single"."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    try:
        value = int(env[name].strip())
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={env[name]!r} must be >= {minimum}")
    return value


def _checked(values: tuple[int, int, int, int], names: tuple[str, ...], addr: str, port: int,
             launcher: str) -> DistEnv:
    """Cross-field checks on (rank, world, local_rank, local_world) read from ``names``."""
    rank, world, local_rank, local_world = values
    for (a, b), (na, nb) in (((rank, world), names[:2]), ((local_rank, local_world), names[2:])):
        if a >= b:
            raise ConfigError(f"{na}={a} must be < {nb}={b}")
    if local_world > world:
        raise ConfigError(f"{names[3]}={local_world} must be <= {names[1]}={world}")
    if not addr.strip():
        raise ConfigError(f"MASTER_ADDR={addr!r} is empty")
    if not 1 <= port <= 65535:
        raise ConfigError(f"MASTER_PORT={port} must be in 1..65535")
    return DistEnv(rank, local_rank, world, local_world, addr.strip(), port, launcher)


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launch from torchrun variables, else Slurm's, else a world of one.

    torchrun wins over Slurm because a torchrun started inside an srun step sees both, and it
    is torchrun that spawned this process. A torchrun rank variable without the rest is an
    error, not a silent fallback: a half-set environment means a broken launch. Slurm is
    recognised by SLURM_PROCID with SLURM_STEP_ID, set per task by srun; a bare ``python`` in
    an sbatch script (no srun) is not a task launch and would wait for peers that never come:
    refused when the job has several tasks, a world of one otherwise.
    """
    env = os.environ if environ is None else environ
    if any(v in env for v in TORCHRUN_VARS[:4]):
        # LOCAL_WORLD_SIZE may be missing: wrappers that set the rest for srun tasks (NVIDIA's
        # pyxis hook, many site scripts) leave it out; it only bounds LOCAL_RANK.
        missing = [v for v in TORCHRUN_VARS if v not in env and v != "LOCAL_WORLD_SIZE"]
        if missing:
            present = ", ".join(f"{v}={env[v]!r}" for v in TORCHRUN_VARS if v in env)
            raise ConfigError(f"incomplete launcher environment: {present} set but "
                              f"{', '.join(missing)} missing")
        world = _int(env, "WORLD_SIZE", 1)
        values = (_int(env, "RANK"), world, _int(env, "LOCAL_RANK"),
                  _int(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else world)
        return _checked(values, ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
                        env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env:
        # srun sets SLURM_STEP_ID for its tasks; the batch script itself has SLURM_PROCID 0
        # and the job's SLURM_NTASKS too, but it is one process, not rank 0 of them.
        if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
            return _read_slurm(env)
        if env.get("SLURM_NTASKS", "1") != "1":
            raise ConfigError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']} but no SLURM_STEP_ID: this is the batch "
                "script itself, not a task srun started; start the ranks with srun "
                "(slurm/train.sbatch) or torchrun per node (slurm/train_torchrun.sbatch)")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", NOMINAL_PORT, "single")


def _read_slurm(env: Mapping[str, str]) -> DistEnv:
    """One task per slot under srun; every task derives the same address and port alone."""
    for name in ("SLURM_NTASKS", "SLURM_LOCALID"):
        if name not in env:
            raise ConfigError(f"SLURM_PROCID={env['SLURM_PROCID']!r} set but {name} missing")
    # SLURM_TASKS_PER_NODE is the actual layout; SLURM_NTASKS_PER_NODE only the request.
    per_node = next((n for n in ("SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE") if n in env),
                    "SLURM_TASKS_PER_NODE")
    local_world = 1
    if per_node in env:
        counts = parse_tasks_per_node(env[per_node], per_node)
        node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else None
        if len(set(counts)) == 1:  # "4" or "4(x2)": the same on every node
            local_world = counts[0]
        elif node is None or node >= len(counts):
            raise ConfigError(f"{per_node}={env[per_node]!r} differs per node; SLURM_NODEID="
                              f"{node} does not pick one of its {len(counts)} nodes")
        else:
            local_world = counts[node]
    addr = env.get("MASTER_ADDR")
    if addr is None:
        # The step's list first: rank 0 runs on the step's first node, which for a step on
        # part of an allocation need not be the allocation's first node.
        lists = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        name = next((n for n in lists if env.get(n)), None)
        if name is None:
            raise ConfigError("MASTER_ADDR unset and SLURM_JOB_NODELIST/SLURM_NODELIST missing")
        try:
            addr = first_host(env[name])
        except ValueError as e:
            raise ConfigError(f"{name}={env[name]!r}: {e}") from None
    job = next((n for n in ("SLURM_JOB_ID", "SLURM_JOBID") if n in env), None)
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:  # from the job id: all tasks agree without talking; below Linux ephemeral ports
        port = 10000 + _int(env, job) % 20000 if job else NOMINAL_PORT
    values = (_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS", 1),
              _int(env, "SLURM_LOCALID"), local_world)
    return _checked(values, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", per_node),
                    addr, port, "slurm")


def parse_tasks_per_node(value: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's compressed per-node counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*([1-9]\d*)\s*(?:\(x([1-9]\d*)\))?\s*", part)
        if m is None:
            raise ConfigError(f"{name}={value!r} is not a Slurm tasks-per-node list")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _split_hosts(nodelist: str) -> list[str]:
    """Split at commas outside brackets, rejecting unbalanced or nested brackets."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1) or (i == len(nodelist) and depth):
            raise ValueError(f"unbalanced brackets in nodelist {nodelist!r}")
        if ch == "," and depth == 0:
            hosts.append(nodelist[start:i].strip())
            start = i + 1
    if not all(hosts):
        raise ValueError(f"empty host name in nodelist {nodelist!r}")
    return hosts


def _parse_host(nodelist: str, host: str) -> list[list[str]]:
    """One host pattern as segments, each a list of alternatives (literal text has one)."""
    segments: list[list[str]] = []
    for m in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", host):
        if m.group(1):
            segments.append([m.group(1)])
        if m.group(2) is not None:
            values: list[str] = []
            for item in m.group(2).split(","):
                r = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
                lo, hi = (r.group(1), r.group(2) or r.group(1)) if r else ("1", "0")
                if int(hi) < int(lo):
                    raise ValueError(f"bad range {item!r} in nodelist {nodelist!r}")
                values.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
            segments.append(values)
    return segments


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm hostlist expansion without ``scontrol`` (absent on many compute images).

    Zero padding follows the range's lower bound ("[098-101]" -> 098..101); several brackets
    in one name expand as a cartesian product with the first bracket varying slowest.
    """
    return ["".join(p) for h in _split_hosts(nodelist)
            for p in itertools.product(*_parse_host(nodelist, h))]


def first_host(nodelist: str) -> str:
    """The first host of a nodelist, parsing only the first pattern."""
    return "".join(seg[0] for seg in _parse_host(nodelist, _split_hosts(nodelist)[0]))


def choose_backend(requested: str, cuda_available: bool | None = None) -> str:
    """Resolve parallel.backend; nccl without CUDA is refused here, not at the first collective."""
    check_choice("parallel.backend", requested, ("auto", "nccl", "gloo"))
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise ConfigError("parallel.backend is 'nccl' but CUDA is not available; use gloo or auto")
    return requested


def check_moe_backend(moe_backend: str, backend: str, cuda_available: bool | None = None) -> None:
    """Refuse an MoE backend this process cannot run, before any process group exists.

    `backend` is choose_backend's answer: gloo means the model trains on the CPU (device_for),
    where MegaBlocks' CUDA/Triton kernels cannot run. With CUDA, MegaBlocks is imported here
    (through its backend module, which is loaded only for this choice), so a missing or broken
    install is a ConfigError on every rank, not an ImportError while the model is built.
    """
    if moe_backend != "megablocks":
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available or backend != "nccl":
        why = ("this machine has no CUDA" if not cuda_available
               else f"parallel.backend is {backend} (CPU training)")
        raise ConfigError(
            "moe.backend megablocks needs CUDA (MegaBlocks' kernels are CUDA/Triton only) and "
            f"parallel.backend nccl or auto; {why}; use moe.backend native or deepspeed on CPU"
        )
    from model.moe import megablocks_backend

    try:
        megablocks_backend.import_megablocks()
    except ImportError as exc:
        raise ConfigError(f"moe.backend megablocks: {exc}") from None


def gpu_index(local_rank: int, count: int | None = None) -> int:
    """The GPU this process trains on: its local rank among the GPUs it sees, or the only one
    it sees (srun --gpus-per-task=1 or --gpu-bind give each task one GPU, visible as cuda:0).
    More processes on a node than visible GPUs is a config error naming both numbers."""
    count = torch.cuda.device_count() if count is None else count
    if count == 1:
        return 0
    if local_rank < count:
        return local_rank
    raise ConfigError(
        f"local rank {local_rank} needs a GPU of its own, but this process sees {count} "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start at most "
        f"{count} processes per node, or give each task its own GPU"
    )


def device_for(backend: str, local_rank: int) -> torch.device:
    """NCCL means one GPU per process (gpu_index); gloo here means CPU training."""
    check_choice("backend", backend, ("nccl", "gloo"))
    return torch.device("cuda", gpu_index(local_rank)) if backend == "nccl" else torch.device("cpu")


def init_distributed(env: DistEnv, backend: str, timeout_s: float) -> None:
    """Join the process group described by ``env`` (``backend`` from choose_backend).

    A world of one ALSO gets a process group, so the trainer has one code path whose
    collectives are no-ops instead of ``if distributed`` branches everywhere. It meets through
    an in-memory HashStore: no port to race for, no socket, no file to clean up. It keeps the
    given backend (gloo on CPU; nccl on one GPU, so collectives on CUDA tensors behave as in
    a larger job).
    """
    if dist.is_initialized():
        raise RuntimeError("init_distributed called twice; the process group already exists")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s ({timeout_s}) must be > 0")
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(gpu_index(env.local_rank))
    if env.is_distributed:
        dist.init_process_group(backend, store=_store(env, timeout), rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)


def _store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with a prefix per torchrun restart attempt.

    Under torchrun the agent hosts the store and keeps it across `--max-restarts` attempts;
    without a prefix, restarted workers read the previous attempt's gloo addresses and fail
    to connect (seen here: "Gloo connectFullMesh failed ... Connection refused"). Launched
    without an agent (Slurm tasks), rank 0 hosts it."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.rank == 0 and not agent, timeout=timeout,
                          multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"moe-train/attempt_{attempt}/", store)


def shutdown_distributed() -> None:
    """Destroy the process group if one exists (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def node_of(environ: Mapping[str, str] | None = None) -> int:
    """This process's node index: torchrun's GROUP_RANK (its --node-rank), else Slurm's
    SLURM_NODEID, else 0."""
    env = os.environ if environ is None else environ
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def set_cpu_threads(backend: str, env: DistEnv, environ: Mapping[str, str] | None = None) -> str:
    """Intra-op threads per process when training on the CPU (gloo), so the ranks of a node
    share its cores instead of each taking all of them: OMP_NUM_THREADS when set (torchrun
    sets 1 for several processes per node), else the cores this process may use divided by
    the processes on its node. Returns what was chosen, for the start-up report."""
    environ = os.environ if environ is None else environ
    if backend != "gloo":
        return f"{torch.get_num_threads()} CPU threads per process"
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return f"{torch.get_num_threads()} CPU threads per process (OMP_NUM_THREADS)"
    threads = cpu_threads(env.local_world_size)
    torch.set_num_threads(threads)
    return (f"{threads} CPU threads per process ({_cores()} cores / {env.local_world_size} "
            "processes on this node; OMP_NUM_THREADS overrides)")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(processes_per_node: int) -> int:
    """The cores this process may use, shared by the processes of its node (at least 1)."""
    return max(1, _cores() // max(1, processes_per_node))


def start_heartbeat(env: DistEnv, timeout_s: float):
    """Each rank's heartbeat in the rendezvous store (parallel/heartbeat.py), so a collective
    failure can name the peer that stalled or died; None for a world of one."""
    if not env.is_distributed:
        return None
    from parallel.heartbeat import Heartbeat, connect

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        store = connect(env.master_addr, env.master_port, env.world_size,
                        f"moe-train/attempt_{attempt}/", timeout_s)
        return Heartbeat(store, env.rank, env.world_size)
    except Exception as exc:  # noqa: BLE001 - training does not depend on it: say so, go on
        if env.rank == 0:
            print(f"warning: no heartbeat ({type(exc).__name__}: {exc}): a collective failure "
                  "will name its group but not the silent peer", flush=True)
        return None
