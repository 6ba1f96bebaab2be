"""One plan: memory, communication and a modelled step time for one layout of one job.

    plan = make_plan(job, world_size=64, gpus_per_node=8, hw=hardware("h100"))
    plan.memory.peak, plan.collectives, plan.time.total_s, plan.fits

Nothing is built but one block of each kind on the meta device (planner/params.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.collective import Collective
from planner.comms import per_log, per_step
from planner.hardware import Hardware, hardware
from planner.memory import MemoryPlan, memory_plan
from planner.model_states import ADAM_MOMENTS, FP32
from planner.shapes import Shapes, make_shapes
from planner.timing import StepTime, a2a_shares, step_time


@dataclass(frozen=True)
class Plan:
    shapes: Shapes
    hw: Hardware
    memory: MemoryPlan
    collectives: list[Collective]
    """One optimizer step's, on the busiest rank."""
    log_collectives: list[Collective]
    """Every logging.log_interval steps."""
    time: StepTime

    @property
    def fits(self) -> bool:
        return self.memory.needed <= self.hw.memory_bytes

    def a2a_traffic(self) -> dict[str, float]:
        """Bytes per step the rank's all-to-alls send to itself, its node, other nodes."""
        total = sum(c.total for c in self.collectives if c.op == "all_to_all")
        own, near, far = a2a_shares(self.shapes)
        return {"self": total * own, "intra-node": total * near, "inter-node": total * far}


def make_plan(job, world_size: int, gpus_per_node: int | None = None, imbalance: float = 1.0,
              device: str = "cuda", hw: Hardware | None = None) -> Plan:
    s = make_shapes(job, world_size, gpus_per_node, imbalance, device)
    hw = hw or hardware()
    memory = memory_plan(s)
    collectives = per_step(s)
    elements = memory.states.optimizer / (ADAM_MOMENTS * FP32)  # this rank's optimizer share
    return Plan(s, hw, memory, collectives, per_log(s), step_time(s, collectives, elements, hw))
