"""moe.backend megablocks on a machine that cannot run it: refused at config time, by name.

The GPU side (equivalence with the native backend) is tests/gpu/test_megablocks.py. An
unknown backend's message, which lists the choices, is checked in test_config.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher.config import load_config
from launcher.env import DistEnv, check_moe_backend
from launcher.train import prepare
from model.config import MoEConfig
from model.errors import ConfigError
from model.moe import build_moe
from model.moe import megablocks_backend
from model.moe.megablocks_backend import INSTALL_SCRIPT

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/cpu_tiny.yaml"
SINGLE = DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single")


@pytest.mark.parametrize("cuda, parallel_backend, why", [
    (False, "auto", "this machine has no CUDA"),
    (True, "gloo", r"parallel.backend is gloo \(CPU training\)"),
])
def test_megablocks_without_cuda_is_refused_before_any_process_group(
        tmp_path, monkeypatch, cuda, parallel_backend, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run_dir = tmp_path / "run"
    argv = ["--config", TINY, "--parallel.dp=null", "--parallel.ep=1", "--moe.backend=megablocks",
            f"--parallel.backend={parallel_backend}", f"--logging.run_dir={run_dir}"]
    with pytest.raises(ConfigError, match=(
            r"moe.backend megablocks needs CUDA \(MegaBlocks' kernels are CUDA/Triton only\) and "
            rf"parallel.backend nccl or auto; {why}; use moe.backend native or deepspeed on CPU")):
        prepare(argv, SINGLE)
    assert not dist.is_initialized()
    assert not run_dir.exists()  # refused before prepare touched anything


def test_megablocks_not_importable_names_the_install_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "megablocks_ops", None)  # import fails even where installed
    with pytest.raises(ConfigError, match=(
            r"moe.backend megablocks: MegaBlocks 0.10.0 with its CUDA ops, grouped_gemm and "
            r"stanford-stk are not importable \(\w*Error: .+\); install them against this "
            rf"torch with {INSTALL_SCRIPT}")):
        check_moe_backend("megablocks", "nccl", cuda_available=True)
    # The model refuses the same way if the launcher's check is bypassed.
    with pytest.raises(ImportError, match=INSTALL_SCRIPT):
        build_moe(16, MoEConfig(backend="megablocks", num_experts=4, expert_hidden=16))
    script = ROOT / INSTALL_SCRIPT
    assert script.is_file() and os.access(script, os.X_OK), f"{script} missing or not executable"


def test_other_backends_skip_the_check_and_never_import_megablocks(monkeypatch):
    """On a machine where megablocks would be checked (CUDA, nccl), only moe.backend megablocks
    calls its import; the others pass without it."""
    calls = []
    monkeypatch.setattr(megablocks_backend, "import_megablocks", lambda: calls.append(1))
    for backend in ("native", "deepspeed"):
        for parallel_backend, cuda in (("nccl", True), ("gloo", False)):
            check_moe_backend(backend, parallel_backend, cuda_available=cuda)
    assert calls == [], f"import_megablocks called {len(calls)} times for other backends"
    check_moe_backend("megablocks", "nccl", cuda_available=True)
    assert calls == [1], "the megablocks check did not go through import_megablocks"
    code = ("import sys; import launcher.train; from model.config import MoEConfig; "
            "from model.moe import build_moe; build_moe(16, MoEConfig()); "
            "bad = [m for m in sys.modules if 'megablocks' in m]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_megablocks_is_a_backend_and_not_bound_by_grouped_mm_alignment():
    job = load_config(["--config", TINY, "--moe.backend=megablocks", "--moe.expert_hidden=100"])
    assert job.validate(world_size=4).ep == 4


@pytest.mark.parametrize("overrides, message", [
    (["--parallel.dp=2", "--parallel.tp=2", "--parallel.ep=2"],
     r"moe.backend megablocks runs with parallel.tp 1 only \(got 2\); use the native backend"),
    (["--moe.capacity_factor=2"],
     (r"moe.capacity_factor \(2.0\) applies only to moe.backend deepspeed; the megablocks "
      r"backend is dropless$")),
    (["--moe.expert_impl=loop"],
     r"moe.expert_impl \('loop'\) does not apply to moe.backend megablocks"),
])
def test_megablocks_refusals_name_the_values(overrides, message):
    job = load_config(["--config", TINY, "--moe.backend=megablocks", *overrides])
    with pytest.raises(ConfigError, match=message):
        job.validate(world_size=4)
