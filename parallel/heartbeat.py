"""Which peer stalled or died: every rank beats a counter in the job's rendezvous store.

A collective that fails names its group (parallel/collectives.py), not the peer that stopped
answering: every rank of the group sees only that the operation timed out or the connection
closed. So each rank keeps a counter `beat/<rank>` in the store, bumped every INTERVAL_S by a
daemon thread (with its host and pid). A rank waiting in a collective keeps beating (torch
releases the GIL there); a rank that is stopped (SIGSTOP, a hung driver call holding the GIL)
or dead does not. After a failure, `silent_ranks` reads every counter twice, WAIT_S apart, and
names the ranks whose counter did not move. Counters, not timestamps: clocks of different
nodes are never compared.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

INTERVAL_S = 1.0
WAIT_S = 3.0


class Heartbeat:
    def __init__(self, store: dist.Store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        self._stop = threading.Event()
        self._count = 0
        self._beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._count += 1
        self.store.set(f"beat/{self.rank}", f"{self._count} {self.me}")

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing left to say
                return

    def _read(self) -> dict[int, tuple[int, dict]]:
        out = {}
        for rank in range(self.world_size):
            try:
                count, _, who = self.store.get(f"beat/{rank}").decode().partition(" ")
                out[rank] = (int(count), json.loads(who))
            except Exception:  # noqa: BLE001 - a missing key or an unreachable store: unknown
                continue
        return out

    def silent_ranks(self) -> str | None:
        """'rank 1 (host h, pid 7)' for the ranks that stopped beating, or None if every rank
        beats (or the store cannot tell). Takes WAIT_S."""
        before = self._read()
        time.sleep(WAIT_S)
        after = self._read()
        silent = [(r, after[r][1]) for r in before if r in after and after[r][0] == before[r][0]]
        silent = [s for s in silent if s[0] != self.rank]
        if not silent:
            return None
        names = ", ".join(f"rank {r} (host {w.get('host')}, pid {w.get('pid')})" for r, w in silent)
        return f"{names} stopped answering: no heartbeat for {WAIT_S:.0f} s (stalled or dead)"

    def stop(self) -> None:
        self._stop.set()


def connect(addr: str, port: int, world_size: int, prefix: str, timeout_s: float) -> dist.Store:
    """A client of the job's TCP store of its own (the beats never share the group's)."""
    store = dist.TCPStore(addr, port, world_size, is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(prefix, store)
