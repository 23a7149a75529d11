"""URLs of the tiers: one spelling for each (``normalize_url``), and never a credential in a
message (``redact_url``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# fsspec protocols and the package that implements each, for the "unsupported scheme" message.
PROTOCOL_PACKAGES = {
    "file": "fsspec",
    "local": "fsspec",
    "memory": "fsspec",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "s3": "s3fs",
    "s3a": "s3fs",
    "az": "adlfs",
    "abfs": "adlfs",
    "hdfs": "pyarrow",
    "sftp": "paramiko",
}


def normalize_url(raw: str) -> str:
    """``/a/b`` and ``file:///a/b`` become ``file:///a/b``; ``gs://b/p/`` becomes ``gs://b/p``."""
    if "://" not in raw:
        return "file://" + str(Path(raw).expanduser().absolute())
    scheme, _, rest = raw.partition("://")
    if scheme in ("file", "local"):
        path = Path(rest).expanduser() if rest.startswith("~") else Path("/" + rest.lstrip("/"))
        return "file://" + str(path.absolute())
    return f"{scheme}://{rest.rstrip('/')}"


def redact_url(url: str) -> str:
    """Hide credentials embedded in a URL (``s3://key:secret@bucket`` -> ``s3://***@bucket``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{path}"


def strip_file_scheme(raw: str) -> str:
    return raw[len("file://") :] if raw.startswith("file://") else raw


def installed_protocols() -> list[str]:
    """fsspec protocols whose implementing package is importable here."""
    return sorted(
        proto
        for proto, package in PROTOCOL_PACKAGES.items()
        if importlib.util.find_spec(package) is not None
    )
