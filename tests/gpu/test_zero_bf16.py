"""ZeRO through DeepSpeed on one GPU: bf16 compute with fp32 master weights.

Skipped without CUDA (and without DeepSpeed's CUDA accelerator). A world of one on NCCL:
five ZeRO-1 steps of the default-shaped model on a fixed batch must lower the loss, the
model's weights must be bf16 while DeepSpeed's master copy stays fp32, and the result must
stay within bf16 tolerance (2e-2 relative) of the same steps in fp32 with zero_stage 0.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(stage: int, steps: int = 5):
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.env import DistEnv, init_distributed, shutdown_distributed
    from model.transformer import TransformerLM
    from parallel.topology import Topology
    from trainer.optim import build_stepper, lr_at

    job = load_config(["--config", "configs/cpu_tiny.yaml", "--parallel.dp=null", "--parallel.ep=1",
                       "--train.warmup_steps=1", f"--parallel.zero_stage={stage}"])
    layout = job.validate(1)
    init_distributed(DistEnv(0, 0, 1, 1, "127.0.0.1", 29500, "single"), "nccl", 120)
    try:
        topo = Topology.create(layout)
        torch.manual_seed(0)
        model = TransformerLM(job.model, job.moe).cuda()
        stepper = build_stepper(model, topo, job.train, stage, local_rank=0)
        x = torch.randint(0, 256, (8, 129), device="cuda")  # same seed, same batch in both runs
        losses = []
        for step in range(steps):
            stepper.begin(lr_at(step, job.train))
            out = stepper.forward(x[:, :-1], x[:, 1:])
            stepper.backward(out.loss)
            stepper.finish()
            losses.append(out.lm_loss.item())
        dtypes = {p.dtype for p in model.parameters()}
        master = [t.dtype for t in getattr(stepper.optimizer, "single_partition_of_fp32_groups", [])]
        dist.barrier()
        return losses, dtypes, master
    finally:
        shutdown_distributed()


def test_zero1_bf16_trains_and_keeps_fp32_master_weights():
    fp32_losses, fp32_dtypes, _ = _train(stage=0)
    bf16_losses, bf16_dtypes, master = _train(stage=1)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert master and set(master) == {torch.float32}
    assert bf16_losses[-1] < bf16_losses[0] - 0.1
    for a, b in zip(bf16_losses, fp32_losses):
        assert abs(a - b) <= 2e-2 * abs(b), (bf16_losses, fp32_losses)
