"""What a training run keeps in its folder, and how it writes it so that a kill loses nothing: checkpoints saved
atomically, a lock against a second run in the same folder, fingerprints of the input checkpoints a resume must find
unchanged, and the logs (``log.csv``, TensorBoard scalars) trimmed back to the checkpoint a resume starts from.
``urda_fast.train.fit`` uses them; ``urda_fast.files`` has the reading side."""

from __future__ import annotations

import csv
import glob
import hashlib
import os

import torch

from urda_fast.files import run_checkpoint

# What a run writes in out_dir (TensorBoard: event files under tb/): an --overwrite removes an earlier run's first.
RUN_FILES = ("best.pt", "last.pt", "log.csv", os.path.join("tb", "events.out.tfevents.*"))


def file_fingerprint(path: str) -> dict:
    """Size and SHA-256 of a file: what a resumed run compares to tell a changed input checkpoint from its own."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def input_fingerprints(inputs: dict) -> dict:
    """``{flag: path}`` of a run's input checkpoints (a folder means its best.pt) -> ``{flag: {"path", "size",
    "sha256"}}`` for ``fit``'s ``extra["inputs"]``: a resume refuses a file that has changed since the run began.
    Empty paths and missing files (the loaders report those) are left out."""
    found = {}
    for flag, path in inputs.items():
        if path and os.path.isfile(run_checkpoint(path)):
            found[flag] = {"path": run_checkpoint(path), **file_fingerprint(run_checkpoint(path))}
    return found


def refuse_to_overwrite(out_dir: str, inputs: dict) -> None:
    """A run writes ``out_dir``/best.pt and last.pt: an input checkpoint at one of those paths (``{flag: path}``; a
    folder means its best.pt, as the loaders read it) would be replaced by the run's own, e.g. a DART teacher by its
    student. A ValueError names the flag, before any work."""
    written = {os.path.realpath(os.path.join(out_dir, name)) for name in ("best.pt", "last.pt")}
    for flag, path in inputs.items():
        if not path:
            continue
        if os.path.realpath(run_checkpoint(path)) in written:
            raise ValueError(f"urda_fast: {flag} {path!r} lies where this run writes its checkpoints ({out_dir}): "
                             "the run would overwrite it; give another --out")


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (disk full, no permission): names the file; the previous one stays."""


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves a torn checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError("... iostream error")
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointWriteError(f"urda_fast: could not write {path} ({type(err).__name__}: {err}); the previous "
                                   "checkpoint there, if any, is untouched: check the free space and the "
                                   "permissions of its folder") from err


class RunLock:
    """An exclusive lock on ``out_dir/.lock`` for a run's duration (rank 0): a second run writing the same folder
    (a relaunched job while the first still runs, --overwrite of a live run) is refused, naming the process that
    holds it. The kernel drops the lock when its process dies, so a killed run leaves none behind. POSIX advisory
    locks (flock): not across NFS clients; no locking on Windows."""

    def __init__(self, out_dir: str):
        self.path, self.file = os.path.join(out_dir, ".lock"), None

    def acquire(self) -> str | None:
        """None when locked by us, else a description of the holder."""
        try:
            import fcntl
        except ImportError:
            return None
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.release()
            return holder
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {os.uname().nodename}")
        self.file.flush()
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def remove_stale_temporaries(out_dir: str) -> None:
    """Temporary files of killed saves (checkpoints, each checkpoint-sized, and log.csv's); only called under the
    run's lock."""
    for pattern in ("*.pt.tmp*", "log.csv.tmp*"):
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            try:
                os.remove(path)
            except OSError:
                pass


def remove_earlier_run(out_dir: str) -> list:
    """The files an earlier run wrote in ``out_dir`` (``RUN_FILES``), removed before a fresh run writes any
    (``--overwrite``'s, or a run's killed before its first checkpoint): a kill before this run's first evaluation
    must not leave the old best.pt or log.csv to pass for this run's. Returns the removed paths."""
    removed = []
    for pattern in RUN_FILES:
        for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    return removed


class CsvLog:
    """Appends rows to ``log.csv``; on resume, rows past the resumed iteration (written after the last checkpoint)
    are dropped so the log matches the weights."""

    def __init__(self, path: str, resume_from: int | None):
        self.path = path
        self.rows = []
        if resume_from is not None and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_from]

    def append(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def flush(self) -> None:
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


class TensorBoardLog:
    """The same rows as scalars in ``folder``. ``purge_step`` makes TensorBoard drop events at steps past the resumed
    iteration (written by the killed run after its last checkpoint, or by an earlier run for a fresh start), as
    ``CsvLog`` drops those rows: a resumed run shows each step once."""

    def __init__(self, folder: str, start: int):
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is slow to import and optional

        self.writer = SummaryWriter(folder, purge_step=start + 1)

    def append(self, group: str, iteration: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", float(value), iteration)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
