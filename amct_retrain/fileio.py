"""Atomic output files: an output is replaced as a whole or not at all (contract section 1)."""
import contextlib
import os
import secrets
from collections.abc import Iterator


def _temp_path(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")


def _write_temp(path: str, data: bytes | str) -> str:
    """Write ``data`` to a fresh temp file beside ``path`` (created folder included), fsynced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temp_path(path)
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # keep an existing file's mode
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


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
        self._staged: list[tuple[str, str]] = []

    def write(self, path: str | os.PathLike, data: bytes | str) -> None:
        path = os.fspath(path)
        try:
            self._staged.append((_write_temp(path, data), path))
        except OSError as err:
            raise OSError(err.errno, f"cannot write output file {path}: {err.strerror}") from None

    def _commit(self) -> None:
        for tmp, path in self._staged:
            os.replace(tmp, path)
        for directory in {os.path.dirname(os.path.abspath(p)) for _, p in self._staged}:
            _fsync_dir(directory)

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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
