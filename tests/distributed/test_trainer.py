"""The trainer's step: gradient accumulation is equivalent to a bigger micro-batch."""

import pytest
import torch

from launcher.config import load_config
from model.transformer import TransformerLM
from parallel.expert_parallel import apply_expert_parallel
from parallel.topology import Topology
from tests.distributed.spawn import run_distributed
from trainer.data import Corpus, rank_data
from trainer.loop import Trainer, _Window

SMALL = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=16",
         "--moe.expert_hidden=16", "--moe.aux_loss_coef=0", "--train.seq_len=16",
         "--train.warmup_steps=1", "--train.grad_clip=0", "--logging.tensorboard=false",
         "--logging.progress=false"]


def _params_after_steps(rank, world, run_dir, micro, accum):
    # The load-balancing loss is not linear in the batch (f_e * P_e), so it is off here; the
    # LM loss and the z-loss are token means, which accumulation must reproduce exactly.
    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, f"--parallel.dp={world}",
                       "--parallel.ep=2", f"--train.micro_batch_size={micro}",
                       f"--train.grad_accum={accum}", f"--logging.run_dir={run_dir}"])
    layout = job.validate(world)
    tokens = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus(tokens.to(torch.uint8), tokens[:2000].to(torch.uint8), "random", 256)
    data = rank_data(corpus, job.train, 256, layout.coords(rank)["dp"], layout.dp)
    topo = Topology.create(layout)
    torch.manual_seed(job.train.seed)
    model = TransformerLM(job.model, job.moe)
    apply_expert_parallel(model, topo)
    trainer = Trainer(job, model, topo, torch.device("cpu"), data)
    # Gradients after one step (Adam is blind to a constant gradient scale, so compare
    # them directly), parameters after two.
    trainer.train_step(_Window())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    trainer.train_step(_Window())
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.distributed
def test_grad_accumulation_equals_a_bigger_micro_batch(tmp_path):
    big = run_distributed(_params_after_steps, 2, (str(tmp_path), 4, 1), timeout_s=120)
    accumulated = run_distributed(_params_after_steps, 2, (str(tmp_path), 2, 2), timeout_s=120)
    for rank in range(2):
        for which in (0, 1):  # gradients after step 1, parameters after step 2
            for name, want in big[rank][which].items():
                got = accumulated[rank][which][name]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} ({which})")


def _handlers_while_saving(rank, world, run_dir):
    import signal

    job = load_config(["--config", "configs/cpu_tiny.yaml", *SMALL, "--parallel.dp=1",
                       "--parallel.ep=1", "--train.micro_batch_size=2", "--train.steps=2",
                       "--train.eval_interval=0", "--train.eval_batches=1",
                       "--checkpoint.save_final=true", f"--logging.run_dir={run_dir}"])
    layout = job.validate(world)
    tokens = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus(tokens.to(torch.uint8), tokens[:2000].to(torch.uint8), "random", 256)
    trainer = Trainer(job, TransformerLM(job.model, job.moe), Topology.create(layout),
                      torch.device("cpu"), rank_data(corpus, job.train, 256, 0, 1))
    before = signal.getsignal(signal.SIGTERM)
    during = []
    save = trainer.save
    trainer.save = lambda: (during.append(signal.getsignal(signal.SIGTERM)), save())[1]
    summary = trainer.fit()
    return (before, [getattr(h, "__qualname__", repr(h)) for h in during],
            signal.getsignal(signal.SIGTERM), "checkpoint" in summary)


@pytest.mark.distributed
def test_stop_handlers_stay_installed_through_the_final_checkpoint(tmp_path):
    """A second SIGTERM (Slurm's, then torchrun's copy) during the final save must only set the
    stop flag, not kill the rank mid-write; after fit the previous handler is back."""
    before, during, after, saved = run_distributed(_handlers_while_saving, 1, (str(tmp_path),),
                                                   timeout_s=120)[0]
    assert saved and during == ["StopSignals._handle"], during
    assert after == before
