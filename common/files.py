"""Writing a file so that a reader (or a crash) sees the old content or the new, never half.

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
