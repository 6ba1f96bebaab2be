"""The exit-code table and one code for a job of many ranks (launcher/exit_codes.py)."""

from __future__ import annotations

import pytest

from checkpoint.errors import CheckpointError, StorageError
from launcher import exit_codes as ec
from launcher.run_dir import RunDirBusy
from model.errors import ConfigError, DataError
from parallel.collectives import CollectiveError
from trainer.divergence import Diverged
from trainer.signals import Interrupted, Preempted


@pytest.mark.parametrize("exc, code", [
    (ConfigError("x"), 2), (DataError("x"), 5), (CheckpointError("x"), 4), (StorageError("x"), 8),
    (CollectiveError("x"), 3), (Diverged("x"), 6), (RunDirBusy("x"), 7), (Preempted("x"), 75),
    (Interrupted("x"), 130), (RuntimeError("x"), 1),
])
def test_each_ending_has_its_code(exc, code):
    assert ec.code_for(exc) == code
    assert ec.MEANING[code]


def test_the_cause_outranks_its_echoes():
    # rank 2 hit a checkpoint error; its peers saw their collectives fail
    assert ec.job_code([3, 3, 4, 3]) == 4
    assert ec.job_code([3, 1, 3]) == 1  # a bug on one rank, echoed as collective failures
    assert ec.job_code([3, None]) == 3  # a rank killed without a word
    assert ec.job_code([0, None]) == 3
    assert ec.job_code([75, 75]) == 75
    assert ec.job_code([130, 75]) == 130  # the first rank's specific code
    assert ec.job_code([0, 0]) == 0


def test_records_round_trip_only_when_a_launcher_asks(tmp_path, monkeypatch):
    monkeypatch.delenv(ec.EXIT_DIR_ENV, raising=False)
    ec.write_record(0, 2, "nothing written")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(ec.EXIT_DIR_ENV, str(tmp_path))
    ec.write_record(1, 6, "step 3: the loss is nan on rank(s) [1]")
    ec.write_record(0, 6, "step 3: the loss is nan on rank(s) [1]")
    records = ec.read_records(tmp_path)
    assert sorted(records) == [0, 1] and records[1]["code"] == 6
    assert records[1]["message"].startswith("step 3") and records[1]["pid"] > 0
