"""Small file helpers shared by data_tools, checkpoints, evaluation and the run directory."""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

# Files meant for other services (Prometheus discovery targets, galleries, reports, run markers)
# must be readable by a server running as another user: mkstemp alone creates them 0600.
SHARED_FILE_MODE = 0o644


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, streamed (multi-GB shards and checkpoints need not fit in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# Temp files of atomic writers are ``<final name>.tmp-<random>`` beside the final file: unique per
# writer (concurrent writers never share one), and sweepable by their prefix after a crash.
TEMP_INFIX = ".tmp-"


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse directory fds)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Union[str, Path], mode: int = SHARED_FILE_MODE) -> Iterator[BinaryIO]:
    """A binary handle whose content appears under ``path`` only when the block ends without error.

    The one atomic-write guarantee of the project: the data goes to a unique temp file in the same
    directory, is fsync'd, gets ``mode`` (default 0644: world-readable, whatever the umask does to
    mkstemp's 0600), then ``os.replace`` puts it in place and the directory is fsync'd. A concurrent
    reader (Prometheus, a browser, the FID watcher, a batch script, a resumed run) sees the old or
    the new file, never half of one; after a crash the new content is either complete or absent.
    On error the temp file is removed and the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}{TEMP_INFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Union[str, Path], data: Union[str, bytes], mode: int = SHARED_FILE_MODE) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` with the guarantee of :func:`atomic_output`."""
    with atomic_output(path, mode) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: Union[str, Path], obj: Any, sort_keys: bool = False) -> Path:
    """``obj`` as indented JSON plus a newline, written with :func:`write_atomic`."""
    return write_atomic(path, json.dumps(obj, indent=1, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def remove_stale_temps(final: Union[str, Path]) -> list[Path]:
    """Delete temp files an interrupted atomic writer of ``final`` left behind; returns them."""
    final = Path(final)
    removed = sorted(final.parent.glob(f"{glob.escape(final.name)}{TEMP_INFIX}*"))
    for leftover in removed:
        leftover.unlink(missing_ok=True)
    return removed


def read_jsonl(path: Union[str, Path], error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """Records of a JSON-lines log (one object with a ``step`` key per line); ``[]`` if the file is missing.

    A torn *last* line (its writer was killed mid-append) is ignored; any other bad line raises
    ``error`` naming the file and the line number.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "step" not in record:
            raise error(f"{path}:{number}: expected a JSON object with a 'step' key, got {line[:80]!r}")
        records.append(record)
    return records


def append_jsonl(path: Union[str, Path], record: dict[str, Any]) -> None:
    """Append ``record`` as one line and fsync it; a torn last line left by a killed writer is cut
    first, so the file holds whole lines only (the caller must be the file's only writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        handle.seek(0)
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
        handle.write((json.dumps(record, sort_keys=True) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())


class UnsafeNameError(ValueError):
    """A name read from data (a sample key) that would escape its directory if used in a path."""


def check_path_component(name: str, what: str) -> str:
    """Return ``name`` if it is safe as one file name component, else raise :class:`UnsafeNameError`.

    Sample keys come from shards and manifests, i.e. from whoever produced the data; they become file
    names (``spade-generate``'s outputs). A separator, a ``..`` / ``.`` component, an empty name or a NUL
    would write outside the intended directory or fail obscurely, so such keys are rejected outright
    rather than rewritten (two rewritten keys could collide)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or ".." in name):
        raise UnsafeNameError(f"{what}: unsafe sample key {name!r} (path separators, '..' and empty keys are not allowed)")
    return name


# errno values that mean "the machine failed us", not "the input is wrong", and what to do about them.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free space there or use another directory",
    errno.EDQUOT: "free space (disk quota exceeded) or use another directory",
    errno.EROFS: "the file system is read-only: remount it writable or use another directory",
    errno.EACCES: "make the directory writable for this user or use another one",
    errno.EPERM: "make the directory writable for this user or use another one",
    errno.EIO: "the storage reported an I/O error: check the device / file system",
    errno.ESTALE: "the network file system lost the file: check the mount",
}


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Union[str, Path]) -> int:
    """Free bytes for an unprivileged writer on the file system holding ``path`` (or its nearest
    existing ancestor); -1 when it cannot be asked."""
    try:
        return shutil.disk_usage(_existing_ancestor(Path(path).absolute())).free
    except OSError:
        return -1


def os_error_of(exc: BaseException) -> "OSError | None":
    """The first environment ``OSError`` (disk full, read-only, permission, I/O) in ``exc`` or its
    cause / context chain: libraries often wrap it (``RuntimeError: ... from OSError``)."""
    seen: set[int] = set()
    current: "BaseException | None" = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _ENVIRONMENT_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def environment_problem(exc: BaseException, what: str = "") -> str:
    """One line for a failure the machine caused (disk full, read-only or unwritable directory, I/O
    error) anywhere in ``exc``'s chain, naming the path, the cause and what to do; "" when ``exc`` is
    something else. ``what`` says what was being written (e.g. "checkpoint of step 12")."""
    error = os_error_of(exc)
    if error is None:
        return ""
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    where = error.filename or ""
    free = f" ({free_bytes(where)} bytes free there)" if where and error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    subject = f"{what}: " if what else ""
    return (f"{subject}cannot write {where or 'a file'}: {error.strerror or name} ({name}){free}; "
            f"{_ENVIRONMENT_ERRNOS[error.errno]}")
