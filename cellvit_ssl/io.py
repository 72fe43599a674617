"""Writing files so that nothing is ever half-written: the package's one atomic-write path.

Every output (checkpoints, configs, indexes, embeddings, statistics, chunk files) is written
to a temporary name beside its destination and renamed over it only once complete, so a crash,
a kill or a full disk leaves either the old file or the new one, never a truncated one.
Filesystem failures become :class:`~cellvit_ssl.errors.CellVitSSLError` subclasses naming the
path and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cellvit_ssl.errors import DataError

__all__ = ["AppendLog", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_with",
           "check_writable", "describe_os_error", "ensure_folder", "exclusive_lock", "remove_path"]


def _blocking_file(path: Path) -> Path | None:
    """The first part of ``path`` (itself included) that exists as something other than a folder."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
        if not part.exists():
            return None
    return None


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """What an ``OSError`` met while writing ``path`` means, in words (full disk, permissions, a file in the way)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or the quota is used up)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only filesystem)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and path is not None:
        blocker = _blocking_file(Path(path).expanduser().parent)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    return exc.strerror or str(exc)


def remove_path(path: str | Path) -> None:
    """Delete a file or a folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, fsync: bool = False,
                error: type[Exception] = DataError) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block completes.

    The temporary is removed when the block raises, so a failed write leaves ``path`` as it
    was. ``directory=True`` is for writers that produce a folder (Zarr stores): an existing
    folder at ``path`` is removed just before the rename.

    Args:
        path: The destination.
        directory: The writer creates a folder rather than a file.
        fsync: Flush the file to disk before the rename (checkpoints).
        error: The error class raised for filesystem failures.

    Raises:
        error: If the folder cannot be created or written (permission, full disk, a file in
            the way), naming ``path``; ``path`` itself is unchanged.

    Examples:
        >>> import json, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "a.json") as tmp:
        ...     _ = tmp.write_text(json.dumps({"a": 1}))
        >>> json.loads((folder / "a.json").read_text())
        {'a': 1}
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise error(f"{path}: cannot write here: {describe_os_error(exc, path)}; nothing was written") from exc
    tmp = Path(name)
    if directory:
        tmp.unlink()
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as exc:
        remove_path(tmp)
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise error(f"{path}: writing failed: {describe_os_error(exc, path)}; {kept}") from exc
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False,
                       error: type[Exception] = DataError) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`) and return the path."""
    with atomic_path(path, fsync=fsync, error=error) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()


def atomic_write_text(path: str | Path, text: str, *, error: type[Exception] = DataError) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


def atomic_write_with(path: str | Path, write: Callable[[Path], None], *, directory: bool = False,
                      fsync: bool = False, error: type[Exception] = DataError) -> Path:
    """Call ``write(tmp)`` on a temporary beside ``path``, then rename it over ``path``."""
    with atomic_path(path, directory=directory, fsync=fsync, error=error) as tmp:
        write(tmp)
    return Path(path).expanduser()


@contextlib.contextmanager
def exclusive_lock(target: str | Path, *, error: type[Exception] = DataError) -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (a ``TARGET.lock`` file beside it) for the block.

    Two runs writing the same output would interleave their results; the second one is refused
    at once with a message naming the process that holds the lock. The lock is an OS-level
    ``flock``: it is released when the block ends or the process dies, so a killed run never
    leaves a lock that blocks the next one (the file itself is removed on a clean exit).

    Raises:
        error: If another process holds the lock, naming it.
    """
    import fcntl
    import json
    import socket
    import time

    target = Path(target).expanduser()
    lock = target.with_name(target.name + ".lock")
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except OSError as exc:
            raise error(f"{target}: cannot write here: {describe_os_error(exc, lock)}; nothing was written") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise error(f"{target} is being written by {holder} (lock file {lock}); wait for it to finish, or "
                        "choose another output") from None
        try:  # the holder before us may have removed the file after we opened it: lock the live one
            same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def _describe_holder(text: str) -> str:
    import json

    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def ensure_folder(path: str | Path, *, error: type[Exception] = DataError, what: str = "") -> Path:
    """Create the folder ``path`` (and its parents) if needed.

    Raises:
        error: If it cannot be created (a file in the way, permissions, a full disk), naming it.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = _blocking_file(path)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else describe_os_error(exc, path)
        raise error(f"{what + ' ' if what else ''}{path}: cannot create the folder: {reason}") from exc
    return path


def check_writable(path: str | Path, *, error: type[Exception] = DataError, what: str = "") -> Path:
    """Refuse, before any work is done, an output path whose folder cannot be written.

    Creates the folder if needed and a temporary file in it (removed at once); ``path`` itself
    is not touched. A folder that only fills up later is caught by the atomic write itself.

    Raises:
        error: Naming the path and why it cannot be written (``what`` names the setting, e.g.
            ``"--json"``).
    """
    path = Path(path).expanduser()
    label = f"{what} {path}" if what else str(path)
    if path.is_dir() and not path.is_symlink() and path.suffix not in (".zarr",):
        raise error(f"{label} is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise error(f"{label}: cannot write here: {describe_os_error(exc, path)}; nothing was written") from exc
    return path


class AppendLog:
    """A text file that grows by whole lines (metrics logs); write failures become named errors.

    Each line is written and flushed at once, so a kill leaves at most a partial last line, which
    readers skip. :meth:`keep` rewrites the file atomically with a subset of its lines (a resumed
    run dropping the records a killed run wrote past its checkpoint).

    Args:
        path: The file (created if missing).
        error: The error class raised for filesystem failures.
        hint: What the user can do, appended to those errors (e.g. what was kept).
    """

    def __init__(self, path: str | Path, *, error: type[Exception] = DataError, hint: str = "") -> None:
        self.path = Path(path).expanduser()
        self.error, self.hint = error, hint
        self._file = None

    def _fail(self, exc: OSError) -> Exception:
        return self.error(f"{self.path}: writing failed: {describe_os_error(exc, self.path)}"
                          + (f"; {self.hint}" if self.hint else ""))

    def keep(self, keep_line: Callable[[str], bool]) -> None:
        """Rewrite the file atomically with only the lines ``keep_line`` accepts (no-op if it is missing)."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if keep_line(line)]
        atomic_write_text(self.path, "".join(line + "\n" for line in lines), error=self.error)

    def write(self, line: str) -> None:
        """Append one line (a newline is added) and flush it to the OS."""
        try:
            if self._file is None:
                self._file = open(self.path, "a")
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        """Close the file (errors on the final flush are named like write errors)."""
        if self._file is not None:
            handle, self._file = self._file, None
            try:
                handle.close()
            except OSError as exc:
                raise self._fail(exc) from exc
