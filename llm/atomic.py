"""Files that appear complete or not at all: the one way this project writes anything a kill
must not leave half-written (token caches, checkpoints, saved models, results, run configs).
A directory written by ``replace_directory`` also lists the SHA-256 of every file in it
(``checksums.json``), and ``verify_directory`` finds any byte changed since."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """A file object whose contents appear at ``path`` complete (flushed and synced), or not at
    all: it is written to a temporary file beside ``path`` and renamed over it on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as error:  # a read-only or full directory
        raise write_failure(path, error) from error
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the file it replaces was not
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failure = write_failure(path, error)
        if failure is not None:
            raise failure from error
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path, text: str) -> None:
    """Replace the text file ``path`` with ``text`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "w") as f:
        f.write(text)


MANIFEST = "checksums.json"


class DamagedFileError(ValueError):
    """A file that is not what was written: missing, of another size, or another checksum."""


class WriteError(OSError):
    """A write that failed (disk full, read-only, file too large), naming what was being
    written; whatever it was replacing is left as it was."""

    def __init__(self, target, cause: str):
        super().__init__(f"cannot write {target}: {cause}")
        self.cause = cause


def write_failure(target, error: BaseException) -> WriteError | None:
    """The WriteError for ``error`` raised while writing ``target``, or None when ``error`` is
    not a failed write. MLX reports its own failed writes as RuntimeError("[write] ...")
    without the reason, so the free space is added."""
    if isinstance(error, WriteError):  # from a directory inside ``target``: name the outer one
        return WriteError(target, error.cause)
    if isinstance(error, OSError):
        cause = error.strerror or str(error)
        if error.filename:
            cause += f" ({error.filename})"
    elif isinstance(error, RuntimeError) and str(error).startswith(("[write]", "[save")):
        cause = str(error).rstrip(".")
        try:
            cause += f" (disk full, read-only or over a file-size limit? " \
                     f"{shutil.disk_usage(Path(target).parent).free / 2**20:,.0f} MiB free there)"
        except OSError:
            pass
    else:
        return None
    return WriteError(target, cause)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """List the size and SHA-256 of every file below ``directory`` in its checksums.json, but
    for those under a directory with a checksums.json of its own (a saved model inside a
    checkpoint): that one is verified when it is read, so no file is hashed twice."""
    nested = [p.parent for p in directory.rglob(MANIFEST) if p.parent != directory]
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST
                   and not any(n in p.parents for n in nested))
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
               for p in files}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=1) + "\n")


def verify_directory(directory) -> bool:
    """Check every file ``directory``'s checksums.json lists; DamagedFileError naming the first
    that is missing or changed. False when there is no checksums.json (a directory written
    elsewhere, or before checksums existed): nothing to check against."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        entries = json.loads(manifest.read_text())
        listed = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise DamagedFileError(f"{manifest} is damaged: {error}") from error
    for name, (size, checksum) in listed.items():
        path = directory / name
        if not path.is_file():
            raise DamagedFileError(f"{path} is missing (listed in {manifest})")
        if path.stat().st_size != size or _sha256(path) != checksum:
            raise DamagedFileError(f"{path} is damaged: its contents differ from what was written "
                                   f"(size or SHA-256 in {manifest})")
    return True


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


def replace_directory(build, directory, keep_replaced_as=None) -> Path:
    """Call ``build(tmp)`` to fill a fresh temporary directory, then move it to ``directory``
    (replacing any previous one). The previous version is parked beside it during the two
    renames; a kill at any moment leaves the old or the new version complete, and
    ``recover_directory`` (run here first, and by the loaders) restores the old one if the
    kill fell between the renames. ``keep_replaced_as``: where the previous version goes once
    the new one is in place (replacing what was there), instead of being deleted."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a saved model should not be
    try:
        build(tmp)
        write_manifest(tmp)
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
            if keep_replaced_as is not None:
                keep_replaced_as = Path(keep_replaced_as)
                if keep_replaced_as.exists():
                    shutil.rmtree(keep_replaced_as)
                os.rename(old / "replaced", keep_replaced_as)
            shutil.rmtree(old)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(directory, error)
        if failure is not None:
            raise failure from error
        raise
    return directory
