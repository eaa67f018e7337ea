"""Files that appear complete or not at all: the one way this project writes anything a kill
must not leave half-written (token caches, checkpoints, saved models, results, run configs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """A file object whose contents appear at ``path`` complete (flushed and synced), or not at
    all: it is written to a temporary file beside ``path`` and renamed over it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the file it replaces was not
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path, text: str) -> None:
    """Replace the text file ``path`` with ``text`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def fsync_path(path: Path):
    """Flush a file, or a directory's entries (after renames), to disk. Directories cannot be
    opened or synced on every platform; their sync is then skipped."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(descriptor)


def recover_directory(directory) -> None:
    """Undo a replacement that a kill interrupted: if ``directory`` is missing but its
    previous version is still parked beside it, put that back; then remove leftovers."""
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    parked = sorted(parent.glob(f".{directory.name}.old-*"))
    if not directory.exists():
        for old in parked:
            if (old / "replaced").is_dir():
                os.rename(old / "replaced", directory)
                break
    for leftover in [*parent.glob(f".{directory.name}.tmp-*"), *parked]:
        shutil.rmtree(leftover, ignore_errors=True)


def replace_directory(build, directory) -> Path:
    """Call ``build(tmp)`` to fill a fresh temporary directory, then move it to ``directory``
    (replacing any previous one). The previous version is parked beside it during the two
    renames; a kill at any moment leaves the old or the new version complete, and
    ``recover_directory`` (run here first, and by the loaders) restores the old one if the
    kill fell between the renames."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model should not be
    try:
        build(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rename(directory, old / "replaced")
        try:
            os.rename(tmp, directory)
        except BaseException:
            if old is not None and not directory.exists():
                os.rename(old / "replaced", directory)
            raise
        fsync_path(directory.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
