"""Which checkpoint a run resumes or starts from.

`find_checkpoints` runs before any process group exists: it opens the checkpoint that
checkpoint.resume or init_from names (or, for resume=auto, every committed checkpoint of the
run dir that opens, newest first) and checks it against the run (checkpoint/compat.py).
`choose` runs once the group exists: under resume=auto the job checks the candidates' file
checksums together, each rank a share of the files, and every rank takes the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from checkpoint.compat import check_compatible
from checkpoint.errors import CheckpointError, agree
from checkpoint.reader import Checkpoint, candidates, resolve, skipped_message
from parallel.collectives import all_gather_object, broadcast_object


@dataclass
class Found:
    """The checkpoints a run may load, newest first, and what was said about broken ones."""

    spec: str | None  # checkpoint.resume or init_from as configured
    checkpoints: list[Checkpoint] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    data: object = None  # the run's Corpus, for the checks of the data (checkpoint/compat.py)


def find_checkpoints(job, run_dir: Path, data=None) -> Found:
    """The checkpoint named by checkpoint.resume or init_from, opened and checked against the
    run; for "auto", every committed checkpoint of the run dir that opens (structure only:
    their files' checksums are checked by the job together, in `choose`)."""
    ck = job.checkpoint
    spec = ck.resume or ck.init_from
    if spec is None:
        return Found(None)
    if spec == "auto":
        found, skipped = candidates(run_dir / "checkpoints")
        out = Found(spec, found, skipped, data)
    else:
        out = Found(spec, [resolve(spec, run_dir / "checkpoints")[0]], data=data)
    if out.checkpoints:
        check_compatible(out.checkpoints[0], job, data)
    return out


def choose(found: Found, job, rank: int, world_size: int) -> Checkpoint | None:
    """The checkpoint every rank loads, or None for a fresh start. Collective.

    The ranks first agree on the candidates (each listed its own run dir): one collective per
    candidate needs the same list everywhere, and a run dir that is not shared, or a save
    landing between listings, would make them differ. Each rank hashes 1/world of a
    candidate's files and the verdicts are gathered, so the job reads it once in all, not once
    per rank, and loads it without hashing again. When committed checkpoints exist and none is usable, that is an
    error, not a fresh start: starting over would set the broken ones aside as it saves."""
    listed = [(str(c.path), c.step) for c in found.checkpoints]
    first = broadcast_object(listed)  # once: a second broadcast on mismatching ranks would hang
    agree(None if listed == first else f"found checkpoints {listed}, rank 0 found {first} "
          "(is the run dir on a shared file system?)", "choosing a checkpoint")
    if found.spec != "auto":
        if not found.checkpoints:
            return None
        ckpt = found.checkpoints[0]
        problems = _shared_check(ckpt, rank, world_size)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"cannot load checkpoint {ckpt.path}: {problems[0]}{more}")
        ckpt.trust()
        return ckpt
    broken = list(found.skipped)
    for ckpt in found.checkpoints:
        problems = _shared_check(ckpt, rank, world_size)
        if not problems:
            ckpt.trust()  # checked by the job: ranks do not hash the files again on load
            check_compatible(ckpt, job, found.data)  # an older one may not fit; every rank raises it
            if rank == 0:
                for line in broken:
                    print(line, flush=True)
            return ckpt
        broken.append(skipped_message(ckpt.path, problems))
    if broken:
        raise CheckpointError(
            f"checkpoint.resume=auto: none of the {len(broken)} committed checkpoints in "
            f"{Path(job.logging.run_dir) / 'checkpoints'} can be loaded:\n  " + "\n  ".join(broken)
            + "\nMove them out of the way to start this run over, or resume from a copy you trust "
            "with --checkpoint.resume=PATH")
    if rank == 0:
        print(f"checkpoint.resume=auto: no checkpoint in {Path(job.logging.run_dir) / 'checkpoints'}, "
              "starting at step 0", flush=True)
    return None


def _shared_check(ckpt: Checkpoint, rank: int, world_size: int) -> list[str]:
    """Every problem with the checkpoint's files, each rank hashing its share. Collective."""
    return [p for share in all_gather_object(ckpt.check_share(rank, world_size)) for p in share]
