"""Write files so that readers see either the old content or the new, never half of it."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A file could not be written (disk full, read-only, gone): its old content is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.
    Any OSError on the way (the temporary file, the writer, fsync, the rename) becomes a
    StorageError naming `target`."""
    target = Path(target)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, _mode(target))
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _sync_folder(target)
    except StorageError:
        raise
    except OSError as exc:
        kept = "its previous content is unchanged" if target.exists() else "nothing was written"
        why = exc.strerror or str(exc)
        raise StorageError(exc.errno, f"cannot write {target}: {why}; {kept}") from exc
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _sync_folder(target: Path) -> None:
    """Make the rename itself durable: until the folder's entry reaches the disk, a power cut
    can bring back the old file, e.g. a ledger without the spend its update already carried."""
    try:
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a file system that cannot sync a folder
            return
        why = exc.strerror or str(exc)
        raise StorageError(exc.errno, f"wrote {target}, but cannot make it durable: {why}") from exc


def _mode(target: Path) -> int:
    """Keep an existing file's permissions; a new file gets what `open` would give it
    (mkstemp's owner-only default would hide shared outputs such as reports)."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_with(target: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Run `writer(tmp_path)` and move the result onto `target` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_with(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
