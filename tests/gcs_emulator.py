"""Start gcp-storage-emulator with two fixes, so that it behaves as real GCS does.

- Exact multipart parsing. The emulator parses multipart uploads with Python's ``email``
  parser, which drops a trailing ``\\r`` from the uploaded body, so any object whose last byte
  is ``\\r`` is stored one byte short (tiered's verification catches it, as it should). This
  launcher splits the body on the boundary exactly.
- Generations. Downloads carry ``x-goog-generation``, and uploads honour ``ifGenerationMatch``
  and ``ifGenerationNotMatch`` (412 when they fail).
- Resumable uploads in linear time. The emulator appends each chunk by copying everything
  received so far (``bytes += chunk``), so a 2 GiB object in 24 MiB chunks copied about 90 GB
  and uploaded at 27 MB/s; chunks now go into one growing buffer per upload.
- A listen backlog of 128, not ``socketserver``'s 5. The emulator serves one request at a time,
  so a daemon uploading a step's files on eight threads while a test polls the bucket overflows
  a backlog of 5: the kernel drops the connection attempts and each waits out a SYN retransmit
  (1 s, then 3, 7, 15 s). A 3 KB promotion took 1.1 s that way, and on a loaded 2-core machine
  one took over a minute. Real GCS never refuses a connection for that.

- With ``GCS_EMULATOR_SERVED_LOG`` set, every object download is appended to that file
  (bucket, name, bytes), so a test can show that a restore read no step data from the store.
- No metadata file in memory. The emulator serializes every object's metadata to one JSON
  file after each write or delete, so each request cost time in proportion to the objects
  stored: deleting a step of 256 simulated nodes' parts took 201 s, and `python -m bench
  scale` could not reach 1,024 nodes. In memory nothing reads that file back, so it is not
  written.
- ``GET /_tiered/requests`` answers how many requests it has served so far (``{"requests":
  N}``, itself not counted), so a benchmark can count what a protocol costs the store.

Otherwise it is the emulator's own ``main``.

    python tests/gcs_emulator.py start --host=127.0.0.1 --port=PORT --in-memory
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import BadRequest, NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage

_original_read_data = server._read_data
server.server.HTTPServer.request_queue_size = 128


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


# Object generations, as real GCS reports and enforces them. Without the headers on downloads,
# tensorstore reads an object's generation as malformed and fails the next conditional write
# ("Malformed StorageGeneration" on manifest.ocdbt, intermittently, when orbax saves straight
# to gs://); without the preconditions, `ifGenerationMatch=0` does not stop an overwrite.
_original_download = objects.download
_original_insert = objects.insert


_SERVED_LOG = os.environ.get("GCS_EMULATOR_SERVED_LOG")


def _download(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    _original_download(request, response, storage, *args, **kwargs)
    if _SERVED_LOG and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        # What the store served, for tests that must show a restore read nothing from it.
        with open(_SERVED_LOG, "a") as log:
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            log.write(f"{bucket}\t{name}\t{len(response._content or b'')}\n")
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        with contextlib.suppress(NotFound):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            response["x-goog-stored-content-length"] = str(obj["size"])


def _precondition_failed(request: Any, storage: Any) -> bool:
    """Whether an upload's ifGenerationMatch / ifGenerationNotMatch rules it out."""
    match = request.query.get("ifGenerationMatch", [None])[0]
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if match is None and not_match is None:
        return False
    name = request.query.get("name", [None])[0]
    data = request.data if name is None else None
    if isinstance(data, dict):  # resumable: the metadata; multipart: its metadata part
        name = data.get("name") or (data.get("meta") or {}).get("name")
    if name is None:
        return False
    try:
        current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
        current = "0"
    if match is not None and match != current:
        return True
    return not_match is not None and not_match == current


def _insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    if _precondition_failed(request, storage):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
    return _original_insert(request, response, storage, *args, **kwargs)


objects.download = _download  # objects.get serves ?alt=media through the module's name
for _regex, _methods in server.HANDLERS:
    for _method, _handler in list(_methods.items()):
        if _handler is _original_download:
            _methods[_method] = _download
        elif _handler is _original_insert:
            _methods[_method] = _insert

_pending: dict[str, bytearray] = {}


def _add_to_resumable_upload(
    self: Any, file_id: str, content: bytes, total_size: int | None = None, expected_start=None
) -> bytes | None:
    safe_id = self.safe_id(file_id)
    buf = _pending.setdefault(safe_id, bytearray())
    if expected_start is not None and expected_start != len(buf):
        raise BadRequest(f"Invalid Content-Range start: expected {len(buf)}, got {expected_start}")
    buf += content or b""
    if total_size is None or len(buf) < total_size:
        return None
    del _pending[safe_id]
    return bytes(memoryview(buf)[:total_size])


def _get_resumable_byte_count(self: Any, file_id: str) -> int:
    return len(_pending.get(self.safe_id(file_id), b""))


_original_write_config = Storage._write_config_to_file


def _write_config_to_file(self: Any) -> None:
    if getattr(self._store, "_use_memory", False):
        return  # read back only when the emulator starts, and in memory it starts empty
    _original_write_config(self)


Storage._write_config_to_file = _write_config_to_file
Storage.add_to_resumable_upload = _add_to_resumable_upload
Storage.get_resumable_byte_count = _get_resumable_byte_count

_served = 0
_original_handle = server.Router.handle


def _handle(self: Any, method: str) -> None:
    global _served
    handler = self._request_handler
    if handler.path == "/_tiered/requests":
        body = json.dumps({"requests": _served}).encode()
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return
    _served += 1  # one request at a time: the server has one thread
    _original_handle(self, method)


server.Router.handle = _handle

if __name__ == "__main__":
    sys.exit(main())
