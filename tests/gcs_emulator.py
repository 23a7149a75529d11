"""Start gcp-storage-emulator with one fix: exact multipart parsing.

The emulator parses multipart uploads with Python's ``email`` parser, which drops a trailing
``\\r`` from the uploaded body, so any object whose last byte is ``\\r`` is stored one byte short
(tiered's verification catches it, as it should). Real GCS does not do this. This launcher splits
the body on the boundary exactly, and is otherwise the emulator's own ``main``.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main

_original_read_data = server._read_data


def _split_part(part: bytes, eol: bytes) -> tuple[dict[str, str], bytes]:
    part = part[len(eol) :] if part.startswith(eol) else part
    head, _, body = part.partition(eol + eol)
    headers = {}
    for line in head.decode("latin-1").split(eol.decode()):
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    # The line break before the next delimiter belongs to the delimiter, not the body.
    return headers, body[: -len(eol)] if body.endswith(eol) else body


def _read_data(request_handler: Any, query: Any) -> Any:
    content_type = request_handler.headers.get("Content-Type") or ""
    if not content_type.startswith("multipart/related"):
        return _original_read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"')
    parts = raw.split(b"--" + boundary.encode())
    eol = b"\r\n" if parts[1].startswith(b"\r\n") else b"\n"
    _, meta = _split_part(parts[1], eol)
    content_headers, content = _split_part(parts[2], eol)
    return {
        "meta": json.loads(meta),
        "content": content,
        "content-type": content_headers.get("content-type", "application/octet-stream"),
    }


server._read_data = _read_data

if __name__ == "__main__":
    sys.exit(main())
