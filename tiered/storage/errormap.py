"""The storage boundary's one mapping table: what fsspec, the OS and the network raise, turned
into tiered's errors (in the manner of httpx's ``_exceptions.py``).

Whatever the table does not name is a permanent ``StorageError``. Programming errors
(``TypeError``, ``AttributeError``, ``KeyError``, ``AssertionError``) pass through as they are,
since hiding a bug as an I/O error helps nobody; tiered's own errors pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from tiered.errors import NotFound, StorageError, TieredError

_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
_ERRNO = {
    # retrying will not help: the name, the permission or the filesystem says no
    errno.EACCES: (False, "permission denied"),
    errno.EPERM: (False, "operation not permitted"),
    errno.EROFS: (False, "read-only filesystem"),
    errno.ENAMETOOLONG: (False, "file name too long for the filesystem"),
    errno.EINVAL: (False, "invalid argument (a name the filesystem rejects?)"),
    errno.ENOTDIR: (False, "a path component is a file, not a directory"),
    errno.EISDIR: (False, "is a directory"),
    errno.ELOOP: (False, "too many symbolic links"),
    # worth retrying with backoff: space can be freed, devices and links recover
    errno.ENOSPC: (True, "no space left on device"),
    errno.EDQUOT: (True, "disk quota exceeded"),
    errno.EIO: (True, "I/O error"),
    errno.ETIMEDOUT: (True, "timed out"),
    errno.ECONNRESET: (True, "connection reset"),
    errno.ECONNREFUSED: (True, "connection refused"),
    errno.EHOSTUNREACH: (True, "host unreachable"),
    errno.ENETUNREACH: (True, "network unreachable"),
}
_TRANSIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google")


def _classify(err: BaseException) -> tuple[bool, str]:
    """(transient, a one-line description) of a foreign error."""
    text = (str(err) or type(err).__name__).splitlines()[0][:300]
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int) and not isinstance(err, OSError):
        return code in _TRANSIENT_HTTP, text
    if isinstance(err, OSError) and err.errno in _ERRNO:
        transient, words = _ERRNO[err.errno]
        return transient, f"{words}: {err.filename}" if err.filename else words
    if isinstance(err, PermissionError):
        return False, text
    if isinstance(err, ValueError):
        return False, text
    transient = isinstance(err, OSError | TimeoutError | ConnectionError) or type(
        err
    ).__module__.startswith(_TRANSIENT_MODULES)
    return transient, text


@contextlib.contextmanager
def translate_errors(what: str, *, missing: str | None = None) -> Iterator[None]:
    """Turn backend errors into tiered's (``StorageError``, ``NotFound``); tiered's own errors
    pass through. ``missing`` is what a ``FileNotFoundError`` means here (say, "the bucket does
    not exist" for a write to an object store)."""
    try:
        yield
    except TieredError:
        raise
    except FileNotFoundError as err:
        raise NotFound(f"{what}: {missing or 'not found'}") from err
    except (TypeError, AttributeError, KeyError, AssertionError):
        raise
    except Exception as err:
        transient, text = _classify(err)
        filename = getattr(err, "filename", None)
        if filename and str(filename) in what:  # said once is enough
            text = text.removesuffix(f": {filename}")
        raise StorageError(f"{what}: {text}", transient=transient) from err
