"""Checks that hold for every test."""

import os

import pytest

# What launchers read (launcher/env.py). A test that leaves one of these set in the pytest
# process hands it to every later job it starts (torchrun, sbatch pass the environment on):
# found when a leftover LOCAL_RANK=0 made the Slurm tests' jobs refuse their environment.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _launch_environment_unchanged():
    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    changed = {k: (before[k], after[k]) for k in LAUNCH_VARIABLES if before[k] != after[k]}
    assert not changed, f"the test changed the launch environment (before, after): {changed}"
