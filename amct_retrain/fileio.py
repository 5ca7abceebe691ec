"""Atomic output files: an output is replaced as a whole or not at all (contract section 1).

An output is first written to a hidden temp file beside it, ``.NAME.<12 hex digits>.tmp``, which
its writer holds an exclusive ``flock`` on until the file is renamed into place or removed. A
writer killed in between leaves the temp file behind, unlocked: the next write to that folder
removes it (:func:`remove_stale_temp_files`), while the temp files of live writers (concurrent
saves) stay locked and are left alone.
"""
import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping

from google.protobuf import text_format
from google.protobuf.message import Message

from amct_retrain.errors import OutputPathError

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
STALE_AFTER_S = 2.0
"""A temp file younger than this is never removed: its writer may not hold its lock yet."""


def _temp_path(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")


def remove_stale_temp_files(directory: str) -> list[str]:
    """Remove the temp files of this module's naming in ``directory`` that no live process
    holds (their writer was killed) and that are older than :data:`STALE_AFTER_S`; returns them."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(directory) if _TEMP_NAME.match(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            if time.time() - os.fstat(fd).st_mtime < STALE_AFTER_S:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def _write_temp(path: str, data: bytes | str | Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write ``data`` (text, bytes, or byte chunks written in turn, e.g. a generator) to a fresh temp file beside
    ``path`` (created folder included), fsynced; returns it and its descriptor, which holds the
    file's lock (close it after the rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _temp_path(path)
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # keep an existing file's mode
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.close(fd)
        raise
    return tmp, fd


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; best effort (not all filesystems allow it).
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one rename."""
    with staged_outputs() as out:
        out.write(path, data)


class StagedOutputs:
    """Outputs written to temp files first and renamed into place only when all succeeded."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, str, int]] = []
        self._cleaned: set[str] = set()

    def write(self, path: str | os.PathLike, data: bytes | str | Iterable[bytes | memoryview]) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            raise OutputPathError(f"{path}: is a folder, not an output file path")
        directory = os.path.dirname(os.path.abspath(path))
        if directory not in self._cleaned:  # what killed writers left in this folder
            self._cleaned.add(directory)
            remove_stale_temp_files(directory)
        try:
            tmp, fd = _write_temp(path, data)
        except OSError as err:
            raise OSError(err.errno, f"cannot write output file {path}: {err.strerror}") from None
        self._staged.append((tmp, path, fd))

    def _commit(self) -> None:
        for tmp, path, _ in self._staged:
            os.replace(tmp, path)
        for directory in {os.path.dirname(os.path.abspath(p)) for _, p, _ in self._staged}:
            _fsync_dir(directory)

    def _discard(self) -> None:
        for tmp, _, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _close(self) -> None:
        for _, _, fd in self._staged:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the lock, after the rename or the removal


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """``with staged_outputs() as out: out.write(path, data)``: every file appears at the end
    of the block, or, if the block raises, none does and no temp file is left."""
    outputs = StagedOutputs()
    try:
        yield outputs
        outputs._commit()
    except BaseException:
        outputs._discard()
        raise
    finally:
        outputs._close()


def _identity(path: str) -> tuple[str, tuple[int, int] | None]:
    """(real path, (st_dev, st_ino) or None if it does not exist) of ``path``."""
    try:
        st = os.stat(path)
        return os.path.realpath(path), (st.st_dev, st.st_ino)
    except OSError:
        return os.path.realpath(path), None


def check_outputs_are_not_inputs(inputs: Mapping[str, str | os.PathLike | None],
                                 outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output path that is one of the inputs ({role: path} each, None
    entries ignored): the same path, a symbolic link to it or a hard link of it (same device and
    inode), so that an input is never overwritten. Raises :class:`OutputPathError`."""
    known = {role: (os.fspath(path), _identity(os.fspath(path))) for role, path in inputs.items() if path is not None}
    for out_role, out_path in outputs.items():
        if out_path is None:
            continue
        out_real, out_id = _identity(os.fspath(out_path))
        for in_role, (in_path, (in_real, in_id)) in known.items():
            if out_real == in_real or (out_id is not None and out_id == in_id):
                raise OutputPathError(f"{os.fspath(out_path)}: the {out_role} to write is the {in_role} "
                                      f"{in_path}: inputs are never overwritten")


def read_text_file(path: str, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file raises ``error`` naming it."""
    if not os.path.exists(path):
        raise error(f"{path}: {what} does not exist")
    if os.path.isdir(path):
        raise error(f"{path}: {what} is a directory, not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None


def parse_text_proto(path: str, text: str, msg: Message, error: type[Exception]) -> None:
    """Parse protobuf text into ``msg``; a syntax error raises ``error`` as FILE:LINE:COL: message."""
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e)
        # ParseError prefixes "LINE:COL : "; re-emit in the usual FILE:LINE:COL: form.
        prefix = f"{line}:{col} : " if col is not None else f"{line} : "
        if line is not None and detail.startswith(prefix):
            detail = detail[len(prefix):]
        where = path if line is None else f"{path}:{line}" if col is None else f"{path}:{line}:{col}"
        # Some messages ("Couldn't parse integer: x") do not name the field: quote the line.
        lines = text.splitlines()
        src = lines[line - 1].strip() if line is not None and 1 <= line <= len(lines) else ""
        if src and src not in detail:
            detail += f" (in: {src[:200]})"
        raise error(f"{where}: {detail}") from None
