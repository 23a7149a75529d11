"""A merged multi-node step's key index, ``tiered-parts/keys.json``: every key of its OCDBT
roots with the size and xxh3-128 of its value. Node 0 writes it at the commit
(``tiered.storage.parts``) and names its digest in the step's manifest; a job of another shape
reads only its own chunks by it (``tiered.storage.partial``)."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from tiered.errors import CommitError
from tiered.layout import PARTS_DIR
from tiered.manifest import FileEntry, Manifest, check_file, digest_of_stream
from tiered.storage.errormap import translate_errors

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

KEYS_NAME = f"{PARTS_DIR}/keys.json"
"""The key index of a merged multi-node step: ``{"roots": {item: {key: [size, xxh3]}}}``."""
KEYS_VERSION = 1


def key_index_doc(roots: dict[str, dict[str, list[Any]]], step: int) -> bytes:
    """The key index's bytes."""
    return json.dumps(
        {"version": KEYS_VERSION, "step": step, "roots": roots}, sort_keys=True
    ).encode()


def read_key_index(tier: StepStore, step: int, manifest: Manifest) -> dict[str, dict[str, list]]:
    """The step's key index, checked against the digest its manifest names."""
    if manifest.key_index is None:
        raise CommitError(f"{tier.step_url(step)} has no key index")
    where = f"{tier.step_url(step)}/{KEYS_NAME}"
    with (
        translate_errors(f"reading {where}"),
        tier.fs.open(tier.object_path(step, KEYS_NAME), "rb") as f,
    ):
        data = f.read()
    check_file(where, manifest.key_index, key_entry(data))
    try:
        roots = json.loads(data)["roots"]
        return {
            str(r): {str(k): [int(v[0]), str(v[1])] for k, v in keys.items()}
            for r, keys in roots.items()
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CommitError(f"{where} is malformed: {err}") from None


def key_entry(data: bytes) -> FileEntry:
    """The manifest entry of the key index's bytes."""
    return digest_of_stream(io.BytesIO(data))
