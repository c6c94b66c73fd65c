"""A run directory belongs to one run at a time, and is either started fresh or continued.

* :func:`lock` takes an exclusive ``flock`` on ``<run>/.aapo.lock`` for the life of the process
  (the OS releases it when the process dies, however it dies), so a second ``aapo train`` on the
  same directory stops with one line instead of interleaving logs and deleting the first run's saves.
* :func:`start` refuses a directory that already holds a run, unless ``--overwrite`` says to
  delete it; the message says which way out applies (resume when a checkpoint exists).
* :func:`continue_from` prepares a resume: it removes unfinished ``step-N.tmp`` saves left by a
  killed run, and moves checkpoints newer than the one resumed from (an abandoned line of
  training) to ``checkpoints/abandoned-from-step-<N>/`` so that a later ``--resume latest`` cannot
  pick them.

All of these run on rank 0 only (see :func:`aapo_app.engine.on_rank0`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from aapo_app.errors import AapoError

LOCK_FILE = ".aapo.lock"
#: files that say a directory holds a run (written when the run starts)
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")

_held: dict[Path, object] = {}  # run directory -> its open, locked lock file (this process's)


def lock(run_dir: Path) -> None:
    """Hold the run directory's lock until :func:`unlock` or the end of the process; one line
    naming the holder when another process has it. Taking it twice in one process is a no-op."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
    except OSError as exc:
        raise AapoError(f"--output-dir: cannot write to '{run_dir}' ({exc.strerror}); choose a writable directory") from exc
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise AapoError(f"--output-dir: '{run_dir}' is in use by another aapo run ({holder}); wait for it to end "
                        f"or choose another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = f


def unlock(run_dir: Path) -> None:
    f = _held.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()  # closing the file releases the flock


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_MARKERS)


def has_checkpoint(run_dir: Path) -> bool:
    from aapo_app.checkpoint import checkpoint_dirs

    return bool(checkpoint_dirs(run_dir))


def start(run_dir: Path, overwrite: bool) -> None:
    """Lock ``run_dir`` for a new run. A directory that holds a run is refused (one line saying how
    to continue or restart it) unless ``overwrite``, which deletes its contents first."""
    run_dir = Path(run_dir)
    if (run_dir / LOCK_FILE).exists():
        lock(run_dir)  # first: a run that is still going is reported as such
    if holds_run(run_dir) and not overwrite:
        _refuse(run_dir)  # before creating anything in it
    lock(run_dir)
    if not holds_run(run_dir):
        return
    if not overwrite:  # another run started between the check and the lock
        _refuse(run_dir)
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _refuse(run_dir: Path) -> None:
    unlock(run_dir)
    if has_checkpoint(run_dir):
        raise AapoError(f"--output-dir: '{run_dir}' already holds a run; continue it with --resume latest, "
                        f"start it again with --overwrite (deletes it), or choose a new directory")
    raise AapoError(f"--output-dir: '{run_dir}' holds a run that saved no checkpoint, so it cannot be resumed; "
                    f"start it again with --overwrite (deletes it) or choose a new directory")


#: what :func:`start` and the trainer write before a run's first step
STARTED_FILES = ("config.yaml", "ds_config.json", "ds_config_reference.json", LOCK_FILE)


def undo_start(run_dir: Path) -> None:
    """Remove what starting a run wrote when it fails before its first step (so the directory does
    not look like a run that could not be resumed), and the directory itself if that empties it."""
    run_dir = Path(run_dir)
    unlock(run_dir)
    for name in STARTED_FILES:
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        pass  # other files were there before the run


def continue_from(step_dir: Path) -> list[str]:
    """Lock the run of checkpoint ``step_dir`` for a resume, clear the remains of killed saves and
    move checkpoints newer than ``step_dir`` aside. Returns notes for the user."""
    from aapo_app.checkpoint import checkpoint_dirs, step_of

    root = Path(step_dir).parent
    run_dir = root.parent
    lock(run_dir)
    notes = []
    for tmp in sorted(root.glob("step-*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp.name}, an unfinished save of a run that was stopped while saving")
    step = step_of(step_dir)
    newer = sorted(s for s in checkpoint_dirs(run_dir) if s > step)
    if newer:
        aside = root / f"abandoned-from-step-{step}"
        aside.mkdir(exist_ok=True)
        for s in newer:
            target = aside / f"step-{s}"
            if target.exists():
                shutil.rmtree(target)
            (root / f"step-{s}").rename(target)
        names = ", ".join(f"step-{s}" for s in newer)
        notes.append(f"resuming from step-{step}: the newer {names} belong to the abandoned line of training and "
                     f"were moved to {aside} (delete them when no longer needed)")
    return notes
