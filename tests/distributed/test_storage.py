"""A write that fails for lack of space names the file and the cause, on every rank, and the
previous checkpoint stays committed and `latest`: on a small tmpfs filled up where this
machine lets the test mount one (root), else with ENOSPC injected into one rank's write."""

from __future__ import annotations

import errno
import subprocess

import pytest

from checkpoint.errors import StorageError
from checkpoint.store import committed
from tests.distributed.ckpt_setup import make_trainer, step_losses
from tests.distributed.spawn import run_distributed


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def _fill(path) -> None:
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def _save_on_a_full_disk(rank, world, run_dir, mounted):
    import torch.distributed as dist

    import checkpoint.save

    trainer = make_trainer(rank, run_dir, "dp2_ep2")
    step_losses(trainer)
    trainer.save()
    step_losses(trainer)
    if mounted:
        if rank == 0:
            _fill(trainer.run_dir)
        dist.barrier()
    elif rank == 1:
        def full(path, tensors):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        checkpoint.save.write_shard = full
    with pytest.raises(StorageError) as err:
        trainer.save()
    return str(err.value)


@pytest.mark.distributed
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    mounted = _mount_tmpfs(run_dir, "16m")
    try:
        messages = run_distributed(_save_on_a_full_disk, 2, (str(run_dir), mounted), timeout_s=180)
        assert messages[0] == messages[1]
        assert "the disk is full (ENOSPC: No space left on device)" in messages[0], messages[0]
        assert "step_00000002.partial/shard_0000" in messages[0], messages[0]
        assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000001"]
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"
        assert not (run_dir / "checkpoints" / "step_00000002.partial").exists()
        print("on a filled tmpfs" if mounted else "ENOSPC injected (no tmpfs could be mounted)")
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir)], check=False)


def _train_with_tensorboard_failing(rank, world, run_dir, mounted):
    from torch.utils.tensorboard import SummaryWriter

    trainer = make_trainer(rank, run_dir, "dp2_ep2", "--logging.tensorboard=true",
                           "--logging.log_interval=1", "--logging.heatmap_interval=1",
                           "--train.steps=4", "--train.eval_interval=0")
    if rank == 0:
        tensorboard = trainer.run_dir / "tensorboard"
        if mounted:  # the first step writes; then the file system turns read-only
            original = SummaryWriter.add_scalar

            def once_then_readonly(self, *args, **kwargs):
                SummaryWriter.add_scalar = original
                original(self, *args, **kwargs)
                self.flush()
                subprocess.run(["mount", "-o", "remount,ro", str(tensorboard)], check=True)

            SummaryWriter.add_scalar = once_then_readonly
        else:
            def readonly(self, *args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system", str(tensorboard))

            SummaryWriter.add_scalar = readonly
    summary = trainer.fit()
    return summary["steps"], trainer.metrics.failure


@pytest.mark.distributed
def test_tensorboard_failing_is_reported_once_and_training_goes_on(tmp_path, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mounted = _mount_tmpfs(run_dir / "tensorboard", "16m")
    try:
        results = run_distributed(_train_with_tensorboard_failing, 2, (str(run_dir), mounted), timeout_s=180)
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir / "tensorboard")], check=False)
    (steps, failure), (steps_1, _) = results
    assert steps == steps_1 == 4
    assert failure.startswith("writing TensorBoard scalars: cannot write")
    assert "the file system is read-only (EROFS" in failure, failure
    out = capfd.readouterr()
    assert out.out.count("TensorBoard and heatmaps are off") == 1, out.out
    assert "Traceback" not in out.err and "Exception in thread" not in out.err, out.err[-3000:]
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["step_00000004"]
