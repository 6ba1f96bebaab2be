"""Checkpoints that are damaged, incomplete, failing to write, or not fitting the model.

Every refusal names the file or the values at fault, and a load that fails on any rank
changes nothing on any rank.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint.load
import checkpoint.save
from checkpoint.compat import check_compatible
from checkpoint.errors import CheckpointError, StorageError
from checkpoint.reader import open_checkpoint, resolve
from checkpoint.select import Found, choose
from checkpoint.store import LATEST, MANIFEST, commit, committed, retain
from launcher.config import load_config
from tests.distributed.ckpt_setup import SMALL, make_trainer, step_losses
from tests.distributed.launch import ROOT, TINY, _env
from tests.distributed.spawn import run_distributed


def _two_checkpoints(rank, world, run_dir):
    trainer = make_trainer(rank, run_dir, "dp2_ep2")
    for _ in range(2):
        step_losses(trainer)
        trainer.save()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults")
    run_distributed(_two_checkpoints, 2, (str(run_dir),), timeout_s=180)
    return run_dir / "checkpoints"


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


DAMAGE = {
    "no commit marker": (lambda d: (d / "COMMIT").unlink(), "COMMIT"),
    "truncated shard": (lambda d: _truncate(d / "shard_00001.pt"), "shard_00001.pt"),
    "corrupted shard": (lambda d: _flip_byte(d / "shard_00001.pt"), "shard_00001.pt"),
    "missing shard": (lambda d: (d / "shard_00000.pt").unlink(), "shard_00000.pt"),
    "edited manifest": (lambda d: _flip_byte(d / "manifest.json", 30), "manifest.json"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoints_are_refused_naming_the_file(copy, damage):
    target = copy / "step_00000002"
    harm, named = DAMAGE[damage]
    harm(target)
    with pytest.raises(CheckpointError, match=named):
        open_checkpoint(target).verify()


@pytest.mark.distributed
def test_resume_auto_skips_a_broken_checkpoint_and_says_so(copy):
    _flip_byte(copy / "step_00000002" / "shard_00001.pt")
    ckpt, skipped = resolve("auto", copy)
    assert ckpt.step == 1
    assert len(skipped) == 1 and "step_00000002" in skipped[0] and "shard_00001.pt" in skipped[0]


def _choose_auto(rank, world, root):
    """checkpoint.select.choose on `world` ranks, counting the files each rank hashes."""
    import checkpoint.reader as reader

    hashed = []
    original = reader.sha256_file

    def counting(path):
        hashed.append(f"{path.parent.name}/{path.name}")
        return original(path)

    reader.sha256_file = counting
    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, "--parallel.dp=2",
                       "--parallel.ep=2", "--train.micro_batch_size=4",
                       f"--logging.run_dir={root.parent}", "--checkpoint.resume=auto"])
    chosen = choose(Found("auto", *reader.candidates(root)), job, rank, world)
    before_load = list(hashed)
    for name in chosen.manifest["files"]:
        chosen.load_file(name)  # trusted: no second hash
    return chosen.step, before_load, hashed == before_load


@pytest.mark.distributed
def test_resume_auto_shares_the_checksums_between_ranks_and_skips_a_broken_one(copy, capfd):
    """The ranks of a job check a candidate's files once between them (each hashes every
    world-th file), agree on the verdict, and never hash them again when loading."""
    _flip_byte(copy / "step_00000002" / "shard_00001.pt")
    results = run_distributed(_choose_auto, 2, (copy,), timeout_s=120)
    files = sorted(p.name for p in (copy / "step_00000002").glob("shard_*.pt"))
    for rank, (step, hashed, no_rehash) in enumerate(results):
        assert step == 1 and no_rehash
        mine = files[rank::2]
        assert hashed == [f"step_00000002/{f}" for f in mine] + [f"step_00000001/{f}" for f in mine]
    out = capfd.readouterr().out
    assert "skipping broken checkpoint" in out and "step_00000002" in out and "shard_00001.pt" in out


def _choose_path(rank, world, path):
    """checkpoint.select.choose of an explicit path, counting the files each rank hashes."""
    import checkpoint.reader as reader

    hashed = []
    original = reader.sha256_file

    def counting(p):
        hashed.append(p.name)
        return original(p)

    reader.sha256_file = counting
    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, f"--checkpoint.resume={path}"])
    try:
        chosen = choose(Found(str(path), [open_checkpoint(path)]), job, rank, world)
    except CheckpointError as exc:
        return str(exc), hashed
    for name in chosen.manifest["files"]:
        chosen.load_file(name)  # trusted: no second hash
    return chosen.step, hashed


@pytest.mark.distributed
def test_an_explicit_checkpoint_is_hashed_once_by_the_job_and_refused_everywhere_if_broken(copy):
    path = copy / "step_00000002"
    files = sorted(p.name for p in path.glob("shard_*.pt"))
    for rank, (step, hashed) in enumerate(run_distributed(_choose_path, 2, (path,), timeout_s=120)):
        assert step == 2 and hashed == files[rank::2]  # its share, and nothing again on load
    _flip_byte(path / "shard_00001.pt")
    messages = [m for m, _ in run_distributed(_choose_path, 2, (path,), timeout_s=120)]
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"cannot load checkpoint {path}: checkpoint file")
    assert "shard_00001.pt is corrupted" in messages[0]


def _choose_from_different_lists(rank, world, roots):
    from checkpoint.reader import candidates

    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, "--parallel.dp=2",
                       "--parallel.ep=2", "--train.micro_batch_size=4", "--checkpoint.resume=auto"])
    with pytest.raises(CheckpointError) as err:
        choose(Found("auto", *candidates(roots[rank])), job, rank, world)
    return str(err.value)


@pytest.mark.distributed
def test_resume_auto_refuses_on_every_rank_when_ranks_list_different_checkpoints(copy, tmp_path):
    """A run dir that is not shared: rank 1 sees only step 1. Every rank raises the same
    error (no rank left waiting in a collective the others skipped)."""
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    shutil.rmtree(other / "step_00000002")
    messages = run_distributed(_choose_from_different_lists, 2, ([copy, other],), timeout_s=60)
    assert messages[0] == messages[1]
    assert "rank(s) [1]" in messages[0] and "shared file system" in messages[0]


def _failed_load(rank, world, run_dir, bad):
    trainer = make_trainer(rank, run_dir, "dp2_ep2")
    step_losses(trainer)
    opt = trainer.stepper.optimizer
    before = ({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
              {i: {k: v.clone() for k, v in opt.state[p].items()}
               for i, p in enumerate(trainer.model.parameters())}, trainer.step, trainer.samples_seen)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError) as err:
        trainer.resume(open_checkpoint(bad))  # structure is fine: only shard_00001's bytes are bad
    params = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(params[n], v) for n, v in before[0].items())
    for i, p in enumerate(trainer.model.parameters()):
        assert all(torch.equal(opt.state[p][k], v) for k, v in before[1][i].items())
    assert (trainer.step, trainer.samples_seen) == before[2:]
    assert torch.equal(torch.get_rng_state(), rng)
    return str(err.value)


@pytest.mark.distributed
def test_a_load_that_fails_on_one_rank_changes_nothing_on_any_rank(copy, tmp_path):
    """Only rank 1 reads shard_00001 (its experts); rank 0 reads everything it needs fine."""
    _flip_byte(copy / "step_00000002" / "shard_00001.pt")
    messages = run_distributed(_failed_load, 2, (str(tmp_path / "run"), str(copy / "step_00000002")),
                               timeout_s=180)
    assert messages[0] == messages[1]
    assert "rank(s) [1]" in messages[0] and "shard_00001.pt is corrupted" in messages[0]


def _install_fails_on_rank_1(rank, world, run_dir, ckpt_dir):
    trainer = make_trainer(rank, run_dir, "dp2_ep2")
    if rank == 1:
        def out_of_memory(staged):
            raise RuntimeError("CUDA out of memory (simulated)")
        checkpoint.load._copy_params = out_of_memory
    with pytest.raises(CheckpointError) as err:
        trainer.resume(open_checkpoint(ckpt_dir))
    return str(err.value)


@pytest.mark.distributed
def test_a_copy_failing_on_one_rank_after_the_checks_fails_every_rank(copy, tmp_path):
    """Every file checked out, then rank 1's copy into its parameters fails: every rank raises
    the same error at once, instead of rank 0 going on into training and timing out there."""
    messages = run_distributed(_install_fails_on_rank_1, 2,
                               (str(tmp_path / "run"), str(copy / "step_00000002")), timeout_s=180)
    assert messages[0] == messages[1]
    assert "installing checkpoint" in messages[0] and "rank(s) [1]" in messages[0]
    assert "CUDA out of memory (simulated)" in messages[0]


def _write_fails_on_rank_2(rank, world, run_dir):
    trainer = make_trainer(rank, run_dir, "dp4_ep2")
    step_losses(trainer)
    if rank == 2:
        def read_only(path, tensors):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        checkpoint.save.write_shard = read_only
    with pytest.raises(StorageError) as err:
        trainer.save()
    return str(err.value)


@pytest.mark.distributed
def test_one_rank_failing_to_write_fails_every_rank_with_its_name(tmp_path):
    messages = run_distributed(_write_fails_on_rank_2, 4, (str(tmp_path),), timeout_s=180)
    assert len(set(messages)) == 1, messages
    assert "failed on rank(s) [2]" in messages[0] and "the file system is read-only (EROFS" in messages[0]
    assert committed(tmp_path / "checkpoints") == []
    assert not (tmp_path / "checkpoints" / "latest").exists()


@pytest.mark.distributed
def test_retention_keeps_the_newest_and_never_fails(copy, monkeypatch):
    shutil.copytree(copy / "step_00000002", copy / "step_00000003")
    assert retain(copy, 2) == []
    assert [p.name for p in committed(copy)] == ["step_00000003", "step_00000002"]
    import checkpoint.store as store

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(store.shutil, "rmtree", refuse)
    warnings = retain(copy, 1)
    assert len(warnings) == 1 and "step_00000002" in warnings[0]
    assert committed(copy)[0].name == "step_00000003"


@pytest.mark.distributed
def test_saving_an_older_step_sets_the_later_ones_aside(copy):
    """A run resumed from step 1 (a rollback) saves step 1 again while step 2 is committed:
    step 2 is set aside, so retention keeps the new save (keep_last 1 used to delete it at
    once, leaving `latest` naming nothing) and resume=auto does not go back to step 2."""
    import json

    staging = copy / "step_00000001.partial"
    shutil.copytree(copy / "step_00000001", staging)
    notes = commit(staging, copy / "step_00000001", json.loads((staging / MANIFEST).read_text()))
    assert notes == ["checkpoint step_00000002 is later than step 1, which was just saved: "
                     "set aside as step_00000002.superseded-by-1"]
    assert [p.name for p in committed(copy)] == ["step_00000001"]
    assert (copy / "step_00000002.superseded-by-1" / "COMMIT").is_file()  # nothing deleted
    assert retain(copy, 1) == [] and (copy / LATEST).read_text() == "step_00000001"
    assert resolve(str(copy), copy)[0].path.name == "step_00000001"
    assert resolve("auto", copy)[0].path.name == "step_00000001"


@pytest.mark.distributed
def test_a_folder_whose_latest_names_nothing_resolves_to_its_newest(copy):
    (copy / LATEST).write_text("step_00000009")
    assert resolve(str(copy), copy)[0].path.name == "step_00000002"


@pytest.mark.distributed
def test_inspect_cli_reports_and_verifies(copy):
    cmd = [sys.executable, "-m", "launcher.inspect_checkpoint", str(copy)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "step 2; Adam step 2" in out and "dp 2 x tp 1, ep 2, zero_stage 0" in out
    assert "model/layers.0.ffn.experts.w1_EDF" in out and "4x32x16" in out
    assert "verified: all 2 files" in out
    _flip_byte(copy / "step_00000002" / "shard_00000.pt")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "verification FAILED" in proc.stdout
    assert "shard_00000.pt" in proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("override, message", [
    ("--moe.num_experts=8", "moe.num_experts is 4 in the checkpoint and 8 here"),
    ("--model.dim=64", "model.dim is 32 in the checkpoint and 64 here"),
    ("--model.vocab_size=512", "model.vocab_size is 256 in the checkpoint and 512 here"),
    ("--moe.shared_expert_hidden=32", "moe.shared_expert_hidden is 24 in the checkpoint and 32 here"),
])
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(saved, override, message):
    job = load_config(["--config", TINY, *SMALL, override])
    with pytest.raises(CheckpointError, match=message):
        check_compatible(open_checkpoint(saved / "step_00000002"), job)


@pytest.mark.distributed
def test_resuming_with_another_sample_order_is_refused_but_init_from_is_not(saved):
    """seq_len and seed fix which samples come when: the saved position would mean other data."""
    ckpt = open_checkpoint(saved / "step_00000002")
    seq_len = ckpt.meta["config"]["train"]["seq_len"]
    for override, key in ((f"--train.seq_len={seq_len // 2}", "train.seq_len"), ("--train.seed=7", "train.seed")):
        job = load_config(["--config", TINY, *SMALL, override, "--checkpoint.resume=auto"])
        with pytest.raises(CheckpointError, match=rf"cannot resume from .*step_00000002: {key} is .* in "
                           r"the checkpoint and .* here.*\(16 samples seen\).*--checkpoint.init_from="):
            check_compatible(ckpt, job)
        check_compatible(ckpt, load_config(["--config", TINY, *SMALL, override, f"--checkpoint.init_from={ckpt.path}"]))
    # the routers' expert bias may not appear in a resumed run; init_from starts it at zero
    job = load_config(["--config", TINY, *SMALL, "--moe.bias_update_rate=0.001", "--checkpoint.resume=auto"])
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_00000002: the routers keep an expert "
                       r"bias in the checkpoint \(moe.expert_bias False, moe.bias_update_rate 0.0\) and do here "
                       r"\(moe.expert_bias False, moe.bias_update_rate 0.001\), so the bias would be missing"):
        check_compatible(ckpt, job)
    # a fixed bias (moe.expert_bias, e.g. an imported DeepSeek-V3 router's) counts as a bias too
    with pytest.raises(CheckpointError, match=r"moe.expert_bias True, moe.bias_update_rate 0.0\), so the bias would"):
        check_compatible(ckpt, load_config(["--config", TINY, *SMALL, "--moe.expert_bias=true",
                                            "--checkpoint.resume=auto"]))
    check_compatible(ckpt, load_config(["--config", TINY, *SMALL, "--moe.bias_update_rate=0.001",
                                  f"--checkpoint.init_from={ckpt.path}"]))
    # a layout or batch change keeps the order (the position is counted in samples)
    check_compatible(ckpt, load_config(["--config", TINY, *SMALL, "--train.micro_batch_size=1", "--checkpoint.resume=auto"]))


@pytest.mark.distributed
def test_init_from_a_checkpoint_without_expert_bias_loads_the_weights_and_starts_the_bias_at_zero(saved):
    from checkpoint.load import load_weights
    from model.transformer import TransformerLM

    ckpt = open_checkpoint(saved / "step_00000002")
    job = load_config(["--config", TINY, *SMALL, "--moe.bias_update_rate=0.001"])
    model = TransformerLM(job.model, job.moe)
    notes = load_weights(ckpt, model)
    assert notes == [f"layers.{i}.ffn.router.expert_bias: not in the checkpoint, starts at its initial value"
                     for i in range(job.model.n_layers)]
    assert all(torch.equal(m.router.expert_bias, torch.zeros(4)) for m in model.moe_layers())
    w = "layers.0.ffn.experts.w1_EDF"
    torch.testing.assert_close(dict(model.named_parameters())[w].detach(), ckpt.full(f"model/{w}"))
