"""train.precision: bf16 training equals fp32 training within bf16 tolerance, on CPU and GPU.

A world of one (gloo on CPU, NCCL on CUDA), a small model (dim 64, 2 blocks), the same fixed batch and
seed, five optimizer steps each:
  - fp32 at zero_stage 0: the reference;
  - bf16 at zero_stage 0: autocast; the weights (and so their gradients and Adam state) stay fp32;
  - bf16 at zero_stage 1: DeepSpeed's bf16 mode; the model's weights are bf16 and the ZeRO
    optimizer keeps an fp32 master copy.
Both bf16 runs must lower the loss and stay within 2e-2 (relative) of the reference at every
step. The CUDA case is a GPU test (skipped without CUDA).
"""

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _train(device: str, stage: int, precision: str, steps: int = 5):
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.env import DistEnv, init_distributed, shutdown_distributed
    from model.transformer import TransformerLM
    from parallel.topology import Topology
    from trainer.optim import build_stepper, compute_dtype, lr_at

    job = load_config(["--config", "configs/cpu_tiny.yaml", "--parallel.dp=null", "--parallel.ep=1",
                       "--model.dim=64", "--model.n_layers=2", "--model.ffn_hidden=128",
                       "--moe.expert_hidden=64", "--train.warmup_steps=1",
                       f"--parallel.zero_stage={stage}", f"--train.precision={precision}"])
    layout = job.validate(1)
    init_distributed(DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single"),
                     "nccl" if device == "cuda" else "gloo", 120)
    try:
        topo = Topology.create(layout)
        torch.manual_seed(0)
        model = TransformerLM(job.model, job.moe).to(device)
        dtype = compute_dtype(precision, torch.device(device))
        stepper = build_stepper(model, topo, job.train, stage, local_rank=0, dtype=dtype)
        autocast = stage == 0 and dtype == torch.bfloat16  # as trainer.loop.Trainer does
        x = torch.randint(0, 256, (8, 129), device=device)
        losses = []
        for step in range(steps):
            stepper.begin(lr_at(step, job.train))
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                out = stepper.forward(x[:, :-1], x[:, 1:])
            stepper.backward(out.loss)
            stepper.finish()
            stepper.update()
            losses.append(out.lm_loss.item())
        dtypes = {p.dtype for p in model.parameters()}
        grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        master = [t.dtype for t in getattr(stepper.optimizer, "single_partition_of_fp32_groups", [])]
        dist.barrier()
        return losses, dtypes, grads, master
    finally:
        shutdown_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_tracks_fp32_with_autocast_and_with_zero(device, monkeypatch):
    # DeepSpeed's engine needs LOCAL_RANK, which ZeroStepper sets in os.environ when absent:
    # set it here so it is removed after the test and cannot leak into later tests' jobs
    # (sbatch passes this process's environment on to the Slurm tests' jobs).
    monkeypatch.setenv("LOCAL_RANK", "0")
    ref, ref_dtypes, _, _ = _train(device, 0, "fp32")
    auto, auto_dtypes, auto_grads, _ = _train(device, 0, "bf16")
    zero, zero_dtypes, _, master = _train(device, 1, "bf16")
    assert ref_dtypes == auto_dtypes == auto_grads == {torch.float32}
    assert zero_dtypes == {torch.bfloat16}
    assert master and set(master) == {torch.float32}
    for losses in (auto, zero):
        assert losses[-1] < losses[0] - 0.1, losses
        for a, b in zip(losses, ref):
            assert abs(a - b) <= 2e-2 * abs(b), (losses, ref)


def _bf16_zero_to_fp32(rank, world, root):
    from checkpoint.reader import resolve
    from tests.distributed.ckpt_setup import make_trainer, step_losses

    src = make_trainer(rank, f"{root}/bf16", "dp2_ep2_zero1", "--train.precision=bf16")
    for _ in range(2):
        step_losses(src)
    src.save()
    bf16 = {n: p.detach().clone() for n, p in src.model.named_parameters()}
    ckpt, _ = resolve(f"{root}/bf16/checkpoints", root)
    dst = make_trainer(rank, f"{root}/fp32", "dp2_ep2", "--train.precision=fp32")
    dst.resume(ckpt)
    extra_bits = 0
    for name, p in dst.model.named_parameters():
        assert bf16[name].dtype == torch.bfloat16 and p.dtype == torch.float32, name
        assert torch.equal(p.detach().to(torch.bfloat16), bf16[name]), name
        extra_bits += int((p.detach() != p.detach().to(torch.bfloat16).float()).sum())
    return extra_bits, step_losses(dst)


@pytest.mark.distributed
def test_bf16_zero_checkpoint_loads_its_fp32_master_weights(tmp_path):
    """ZeRO bf16 saves the fp32 master copy beside the bf16 weights; an fp32 run that loads it
    gets the master values (whose bf16 rounding is the bf16 model), not the rounded ones."""
    from tests.distributed.spawn import run_distributed

    results = run_distributed(_bf16_zero_to_fp32, 2, (str(tmp_path),), timeout_s=300)
    for extra_bits, losses in results:
        assert extra_bits > 0
        assert all(torch.isfinite(torch.tensor(losses)))
