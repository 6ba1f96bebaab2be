"""What goes wrong with checkpoints, and how every rank learns it together.

A CheckpointError is not a config error: the config may be fine and the checkpoint missing,
corrupt or of another model. It has its own exit code (launcher/exit_codes.py). A failure to
write (a full disk, a read-only or forbidden directory) is a StorageError, whatever is being
written, and names the path and the cause; the previous checkpoint is kept.
"""

from __future__ import annotations

import errno

from parallel.collectives import all_gather_object


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete, corrupted or does not fit the run."""


class StorageError(Exception):
    """A file the run must write could not be written (disk full, read-only, permission)."""


_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted"}


def write_failure(path, exc: BaseException) -> str:
    """'cannot write PATH: the disk is full (ENOSPC: No space left on device)'. torch.save
    reports a full disk as a RuntimeError from its zip writer ("unexpected pos"), naming
    neither the file nor the cause: the cause is the OSError it was raised while handling."""
    os_error = os_error_in(exc)
    if os_error is None or os_error.errno is None:
        return f"cannot write {path}: {type(exc).__name__}: {exc}"
    name = errno.errorcode.get(os_error.errno, str(os_error.errno))
    cause = _CAUSES.get(os_error.errno, os_error.strerror or name)
    return f"cannot write {path}: {cause} ({name}: {os_error.strerror})"


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or one it was raised from or while handling."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def raise_failed(errors: list[str | None], what: str, error_type: type[Exception] = CheckpointError) -> None:
    """Raise `error_type` naming the ranks whose entry in `errors` is set, if any."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        ranks = [r for r, _ in failed]
        raise error_type(f"{what} failed on rank(s) {ranks}; rank {failed[0][0]}: {failed[0][1]}")


def agree(error: str | None, what: str, error_type: type[Exception] = CheckpointError) -> None:
    """Collective over the world: if any rank has an error, every rank raises the same one,
    naming the ranks that failed."""
    raise_failed(all_gather_object(error), what, error_type)
