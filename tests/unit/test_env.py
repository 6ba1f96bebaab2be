"""launcher.env: reading the launch environment, hostlists, backend choice, process-group setup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher.env import (
    DistEnv,
    choose_backend,
    device_for,
    expand_nodelist,
    first_host,
    init_distributed,
    read_env,
    shutdown_distributed,
)
from model.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29501"}
SLURM = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "node[03-04]",
         "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}


# --- read_env ---------------------------------------------------------------------------

def test_torchrun_env():
    env = read_env(TORCHRUN)
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                          master_addr="10.0.0.7", master_port=29501, launcher="torchrun")
    assert env.is_distributed


def test_torchrun_world_of_one_is_not_distributed():
    env = read_env({**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                    "LOCAL_WORLD_SIZE": "1"})
    assert env.launcher == "torchrun" and not env.is_distributed


def test_slurm_env():
    env = read_env(SLURM)
    assert env == DistEnv(rank=6, local_rank=2, world_size=8, local_world_size=4,
                          master_addr="node03", master_port=10000 + 123456 % 20000,
                          launcher="slurm")


def test_slurm_port_is_derived_from_job_id_and_deterministic():
    a = read_env({**SLURM, "SLURM_JOB_ID": "40001"})
    b = read_env({**SLURM, "SLURM_JOB_ID": "40001", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert a.master_port == b.master_port == 10001
    assert read_env({**SLURM, "SLURM_JOB_ID": "40002"}).master_port == 10002
    no_id = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    assert read_env({**no_id, "SLURM_JOBID": "7"}).master_port == 10007


def test_slurm_explicit_master_overrides():
    env = read_env({**SLURM, "MASTER_ADDR": "login1", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port, env.launcher) == ("login1", 4242, "slurm")


def test_slurm_plain_nodelist_fallback():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert read_env({**env, "SLURM_NODELIST": "gpu-a[7-8],node1"}).master_addr == "gpu-a7"


def test_slurm_step_nodelist_wins_over_job_nodelist():
    """A step on part of an allocation has its rank 0 on the step's first node."""
    env = read_env({**SLURM, "SLURM_STEP_NODELIST": "node[07-08]"})
    assert env.master_addr == "node07"


@pytest.mark.parametrize("tasks, node, expected", [
    ("4", "1", 4),
    ("4(x2)", "1", 4),
    ("2(x3),1", "0", 2),
    ("2(x3),1", "2", 2),
    ("2(x3),1", "3", 1),
    ("3,1", "1", 1),
])
def test_slurm_tasks_per_node_formats(tasks, node, expected):
    env = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "7",
           "SLURM_NODEID": node, "SLURM_TASKS_PER_NODE": tasks}
    assert read_env(env).local_world_size == expected


def test_slurm_ntasks_per_node_and_missing_fallback():
    base = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    base.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    assert read_env({**base, "SLURM_NTASKS_PER_NODE": "4"}).local_world_size == 4
    assert read_env(base).local_world_size == 1


def test_torchrun_takes_precedence_over_slurm():
    env = read_env({**SLURM, **TORCHRUN})
    assert env.launcher == "torchrun"
    assert (env.rank, env.world_size, env.master_addr) == (5, 8, "10.0.0.7")


def test_single_process():
    env = read_env({"HOME": "/root", "PATH": "/bin"})
    assert env == DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single")
    assert not env.is_distributed


def test_defaults_to_os_environ(monkeypatch):
    for name in list(os.environ):
        if name in TORCHRUN or name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        read_env()
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    assert read_env().rank == 5


@pytest.mark.parametrize("env, fragments", [
    ({"RANK": "0"}, ["RANK='0'", "WORLD_SIZE", "MASTER_PORT"]),
    ({**TORCHRUN, "RANK": "abc"}, ["RANK='abc'", "integer"]),
    ({**TORCHRUN, "WORLD_SIZE": "2.5"}, ["WORLD_SIZE='2.5'"]),
    ({**TORCHRUN, "RANK": "8"}, ["RANK=8", "WORLD_SIZE=8"]),
    ({**TORCHRUN, "LOCAL_RANK": "-1"}, ["LOCAL_RANK='-1'", ">= 0"]),
    ({**TORCHRUN, "WORLD_SIZE": "0"}, ["WORLD_SIZE='0'"]),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, ["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, ["MASTER_PORT=70000"]),
    ({**TORCHRUN, "MASTER_PORT": "x"}, ["MASTER_PORT='x'"]),
    ({**TORCHRUN, "MASTER_ADDR": " "}, ["MASTER_ADDR"]),
    ({**SLURM, "SLURM_PROCID": "8"}, ["SLURM_PROCID=8", "SLURM_NTASKS=8"]),
    ({**SLURM, "SLURM_NTASKS": "many"}, ["SLURM_NTASKS='many'"]),
    ({**SLURM, "SLURM_LOCALID": "-2"}, ["SLURM_LOCALID='-2'"]),
    ({**SLURM, "SLURM_LOCALID": "4"}, ["SLURM_LOCALID=4", "SLURM_TASKS_PER_NODE=4"]),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, ["SLURM_PROCID='0'", "SLURM_NTASKS"]),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"},
     ["SLURM_NTASKS=8 but no SLURM_STEP_ID", "start the ranks with srun"]),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "4(2)"}, ["SLURM_TASKS_PER_NODE='4(2)'"]),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "5"}, ["SLURM_NODEID=5", "'2,1'"]),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1", "SLURM_LOCALID": "1"},
     ["SLURM_LOCALID=1", "SLURM_TASKS_PER_NODE=1"]),
    ({k: v for k, v in SLURM.items() if k != "SLURM_NODEID"} | {"SLURM_TASKS_PER_NODE": "2,1"},
     ["SLURM_TASKS_PER_NODE='2,1'", "SLURM_NODEID=None"]),
    ({**SLURM, "SLURM_JOB_NODELIST": "node[03-04"}, ["SLURM_JOB_NODELIST='node[03-04'"]),
    ({**SLURM, "SLURM_JOB_ID": "j12"}, ["SLURM_JOB_ID='j12'"]),
])
def test_invalid_env_names_variable_and_value(env, fragments):
    with pytest.raises(ConfigError) as info:
        read_env(env)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_slurm_missing_nodelist_without_master_addr():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        read_env(env)


# --- hostlists --------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("node[1,3-4],gpu-a[7-8]", ["node1", "node3", "node4", "gpu-a7", "gpu-a8"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("login1,node[5]-ib", ["login1", "node5-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "node[[1-2]]", "node[]",
                                 "node[3-1]", "node[a-b]", "a,,b", ""])
def test_malformed_nodelist(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace("]", r"\]")):
        expand_nodelist(bad)


# --- backend and device ------------------------------------------------------------------

def test_choose_backend():
    assert choose_backend("auto", cuda_available=True) == "nccl"
    assert choose_backend("auto", cuda_available=False) == "gloo"
    assert choose_backend("nccl", cuda_available=True) == "nccl"
    assert choose_backend("gloo", cuda_available=True) == "gloo"
    assert choose_backend("gloo", cuda_available=False) == "gloo"
    assert choose_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


def test_choose_backend_nccl_without_cuda():
    with pytest.raises(ConfigError, match="parallel.backend is 'nccl' but CUDA is not available"):
        choose_backend("nccl", cuda_available=False)


def test_choose_backend_unknown():
    with pytest.raises(ConfigError, match="mpi"):
        choose_backend("mpi", cuda_available=False)


def test_device_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device_for("nccl", 3) == torch.device("cuda", 3)
    assert device_for("gloo", 3) == torch.device("cpu")


# --- process groups ---------------------------------------------------------------------

def test_init_world_of_one_gives_working_group():
    env = read_env({})
    assert not dist.is_initialized()
    try:
        init_distributed(env, "gloo", timeout_s=30)
        assert dist.is_initialized()
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        t = torch.tensor([3.0, 4.0])
        dist.all_reduce(t)
        assert t.tolist() == [3.0, 4.0]
        with pytest.raises(RuntimeError, match="already exists"):
            init_distributed(env, "gloo", timeout_s=30)
    finally:
        shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # idempotent


def test_init_rejects_bad_timeout():
    with pytest.raises(ConfigError, match="timeout_s"):
        init_distributed(read_env({}), "gloo", timeout_s=0)
    assert not dist.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_two_processes_over_tcp():
    """A real 2-rank gloo world from torchrun-style variables (subprocesses keep this one clean)."""
    script = textwrap.dedent("""
        import torch, torch.distributed as dist
        from launcher.env import init_distributed, read_env, shutdown_distributed
        env = read_env()
        init_distributed(env, "gloo", timeout_s=60)
        t = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(t)
        print("SUM", dist.get_world_size(), t.item())
        shutdown_distributed()
    """)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        assert "SUM 2 3.0" in out, out


def test_torchrun_style_variables_without_local_world_size_are_a_launch():
    """NVIDIA's pyxis hook and many srun wrappers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*
    but not LOCAL_WORLD_SIZE."""
    env = read_env({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 8)


def test_a_batch_script_of_one_task_is_a_world_of_one():
    env = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                    "SLURM_JOB_ID": "7"})
    assert (env.launcher, env.world_size) == ("single", 1)


def test_each_rank_gets_the_gpu_it_can_see():
    from launcher.env import gpu_index

    assert gpu_index(3, count=4) == 3  # every process sees the node's GPUs
    assert gpu_index(3, count=1) == 0  # srun --gpus-per-task=1: each task sees its own
    with pytest.raises(ConfigError, match=r"local rank 4 needs a GPU of its own, but this process sees 2"):
        gpu_index(4, count=2)
