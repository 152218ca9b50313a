"""Writing a file so that a reader (or a crash) sees the old content or the new, never half;
reading a secret only from a file no one else may read.

One way for every state file pytun keeps: the hub's key and settings, laptop configs, the
client's state file. The temporary file has the final mode from its first byte, is synced,
then renamed over the old one.
"""

from __future__ import annotations

import os


def write_atomic(path: str, data: str | bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data`; mode 0600 unless told otherwise. Raises OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask said
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def create_private(path: str) -> None:
    """Create `path` empty, mode 0600, failing if it exists (FileExistsError, else OSError):
    the claim on a name that will hold a secret, taken before the secret is made."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class ExposedFile(Exception):
    """A secret's file that group or others may read; the message says how to fix it."""

    def __init__(self, path: str, mode: int) -> None:
        super().__init__(f"{path} is readable by others (mode {mode:04o}); run chmod 600 {path}")
        self.mode = mode


def read_private(path: str, *, limit: int = -1, encoding: str = "ascii") -> str:
    """The text of a secret's file (at most `limit` characters). Raises ExposedFile when its
    mode lets group or others read it (checked on the open file, not the name), else OSError."""
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, encoding=encoding, errors="replace") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise ExposedFile(path, mode)
        return f.read(limit)
