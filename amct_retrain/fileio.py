"""Atomic output files: an output is replaced as a whole or not at all (contract section 1)."""
import contextlib
import os
import secrets
from collections.abc import Iterator

from google.protobuf import text_format
from google.protobuf.message import Message


def _temp_path(path: str) -> str:
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")


def _write_temp(path: str, data: bytes | str | list[bytes | memoryview]) -> str:
    """Write ``data`` (text, bytes, or byte chunks written in turn) to a fresh temp file beside
    ``path`` (created folder included), fsynced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temp_path(path)
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
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

    def write(self, path: str | os.PathLike, data: bytes | str | list[bytes | memoryview]) -> None:
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


def check_outputs_are_not_inputs(inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Refuse an output path that is an existing input file ({role: path} each)."""
    for out_role, out_path in outputs.items():
        for in_role, in_path in inputs.items():
            if os.path.exists(out_path) and os.path.exists(in_path) and os.path.samefile(out_path, in_path):
                raise ValueError(f"{out_role} '{out_path}' is the {in_role}: inputs are never overwritten")


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
