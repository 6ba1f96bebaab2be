"""all_to_all_single with uneven splits on gloo: round trip, empty senders/receivers, autograd."""

import threading
import time

import pytest
import torch
import torch.distributed as dist

from parallel.collectives import ProcessGroupExpertComm, all_to_all
from tests.distributed.spawn import run_distributed

# SENDS[src][dst] = rows src sends to dst. Rank 0 sends nothing; rank 1 receives nothing.
SENDS = [[0, 0, 0, 0],
         [3, 0, 1, 2],
         [1, 0, 0, 4],
         [2, 0, 5, 1]]


def _rows(src: int, dst: int, n: int) -> torch.Tensor:
    """Row i from src to dst carries (src, dst, i) so the receiver can check its origin."""
    return torch.tensor([[src, dst, i] for i in range(n)], dtype=torch.float32).reshape(n, 3)


def _round_trip(rank, world):
    group = dist.group.WORLD
    comm = ProcessGroupExpertComm(group)
    send_counts = torch.tensor(SENDS[rank]).view(world, 1)
    recv_counts = comm.exchange_counts(send_counts)
    assert recv_counts.flatten().tolist() == [SENDS[s][rank] for s in range(world)]

    x = torch.cat([_rows(rank, d, SENDS[rank][d]) for d in range(world)]).requires_grad_()
    in_splits = SENDS[rank]
    out_splits = recv_counts.flatten().tolist()
    y = all_to_all(x, out_splits, in_splits, group)
    want = torch.cat([_rows(s, rank, SENDS[s][rank]) for s in range(world)])
    torch.testing.assert_close(y.detach(), want)

    back = all_to_all(y, in_splits, out_splits, group)
    torch.testing.assert_close(back.detach(), x.detach())
    # d/dx sum(y * y.detach()) routes y's values back to where they came from: equals x.
    (y * y.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x.detach())
    return y.shape[0]


@pytest.mark.distributed
def test_uneven_round_trip_with_empty_sender_and_receiver():
    received = run_distributed(_round_trip, world_size=4, timeout_s=60)
    assert received == [sum(SENDS[s][r] for s in range(4)) for r in range(4)]
    assert received[1] == 0


def _one_rank_hangs(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 gives up")
    threading.Event().wait()  # rank 0 hangs outside any collective: only a kill ends it


@pytest.mark.distributed
def test_spawn_helper_turns_a_hang_into_a_fast_failure():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_one_rank_hangs, world_size=2, timeout_s=120)
    text = str(info.value)
    assert "rank 1 gives up" in text and "ranks [0] did not report" in text
    assert time.monotonic() - start < 60  # the grace period, not the 120 s timeout
