"""A failed write as an OSError that names the path and the cause, and the rename that makes a write atomic.

Writers below us lose the operating system's error on the way up: torch.save's C++ writer
raises "RuntimeError: basic_ios::clear: iostream error" on a full disk, safetensors a
SafetensorError with "(os error 28)" in its text, and a plain file write an OSError with no
file name. Converting, exporting and checkpointing pass such errors through `write_error`, so
the user reads "<path>: No space left on device", and callers can catch one class (OSError).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_CODES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def write_error(err: BaseException, path: str | Path) -> BaseException:
    """`err` as an OSError naming `path` when it is a write failure; otherwise `err` itself."""
    if isinstance(err, OSError) and err.errno is not None:
        return err if err.filename else OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    text = str(err)
    for code in _CODES:
        if f"os error {code})" in text or os.strerror(code) in text:
            return OSError(code, os.strerror(code), str(path))
    if isinstance(err, RuntimeError):  # the error says nothing: ask the filesystem that refused it
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            st = os.statvfs(where)
        except OSError:
            return err
        if st.f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        if st.f_bavail * st.f_frsize < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return err
