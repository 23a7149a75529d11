"""The keys of a node's OCDBT database, for the dedup (``tiered.storage.dedup``): list them with
a digest of each value, copy the keys a node owns into a database of their own, and rebuild a
node's database from a merged durable step, each value checked against its digest, and pick
from one the keys a restoring process needs (``tiered.storage.partial``).

For the daemon, like the merge, this runs in a child process (``python -m
tiered.storage.ocdbt_keys``) that imports tensorstore and nothing of jax or orbax, so the daemon
stays small and a crash in native code costs one attempt. The pick of a restoring process runs
in the trainer's process (``run``), which has tensorstore already and reads the store as orbax
does. A value is read whole (a chunk of an array, as orbax writes and reads
it), and copies commit every ``BATCH_BYTES`` so that memory stays bounded by a batch (and the
``READ_AHEAD`` values in flight, twice), not the database.

Keys are bytes; in JSON they travel as latin-1 text, which maps every byte to one character and
back.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import xxhash

BATCH_BYTES = 256 * 2**20
"""A copy commits a transaction once it holds this many bytes of values (and at the end)."""
READ_AHEAD = 8
"""Values read at once."""


def _open(spec: dict[str, Any], context: Any) -> Any:
    import tensorstore as ts

    return ts.KvStore.open({"driver": "ocdbt", "base": spec}, context=context).result()


def value_digest(value: bytes) -> str:
    """What an index records of a value (xxh3-128, 32 hex digits)."""
    return xxhash.xxh3_128_hexdigest(value)


def _index(job: dict[str, Any], context: Any) -> dict[str, list[Any]]:
    kv = _open(job["db"], context)
    keys = sorted(kv.list().result())
    out: dict[str, list[Any]] = {}
    for start in range(0, len(keys), READ_AHEAD):
        batch = keys[start : start + READ_AHEAD]
        reads = [kv.read(k) for k in batch]
        for key, read in zip(batch, reads, strict=True):
            value = read.result().value
            out[key.decode("latin-1")] = [len(value), value_digest(value)]
    return out


def _value(key: str, got: Any, facts: list[Any] | None) -> bytes:
    """A value read (tensorstore's ``ReadResult``), checked against ``facts`` ([size, digest])
    when given; what is missing or differs ends the child (or the caller's copy) naming the key."""
    if got.state != "value":
        raise SystemExit(f"key {key!r} is missing from the source database")
    value = bytes(got.value)
    if facts is not None:
        size, digest = facts
        if len(value) != size or value_digest(value) != digest:
            raise SystemExit(
                f"key {key!r}: {len(value)} bytes read, digest {value_digest(value)}, "
                f"but the index says {size} bytes, digest {digest}"
            )
    return value


def _copy(
    src: Any,
    dest_spec: dict[str, Any],
    keys: list[str],
    context: Any,
    expect: dict[str, list[Any]] | None = None,
) -> None:
    """Copy ``keys`` of ``src`` into a new database at ``dest_spec``, a transaction per batch;
    with ``expect``, each value must have the size and digest it names."""
    import tensorstore as ts

    dest = _open(dest_spec, context)
    txn = ts.Transaction()
    held = 0
    for start in range(0, len(keys), READ_AHEAD):
        batch = keys[start : start + READ_AHEAD]
        reads = [src.read(k.encode("latin-1")) for k in batch]
        for key, read in zip(batch, reads, strict=True):
            value = _value(key, read.result(), expect[key] if expect is not None else None)
            dest.with_transaction(txn)[key.encode("latin-1")] = value
            held += len(value)
        if held >= BATCH_BYTES:
            txn.commit_async().result()
            txn, held = ts.Transaction(), 0
    txn.commit_async().result()


def _build(job: dict[str, Any], context: Any) -> None:
    _copy(_open(job["src"], context), job["dest"], list(job["keys"]), context)


def _rebuild(job: dict[str, Any], context: Any) -> None:
    from tiered.storage.merge import merge_into

    expect = job["keys"]
    _copy(_open(job["src"], context), job["dest"], sorted(expect), context, expect=expect)
    merge_into(job["root"], [job["child"]], context)


def read_checked(src_spec: dict[str, Any], expect: dict[str, list[Any]]) -> dict[str, bytes]:
    """The values of ``expect``'s keys (small: an array's metadata), each checked against its
    size and digest; in the caller's process."""
    import tensorstore as ts

    src = _open(src_spec, ts.Context())
    return {
        key: _value(key, src.read(key.encode("latin-1")).result(), facts)
        for key, facts in sorted(expect.items())
    }


def _copy_keys(job: dict[str, Any], context: Any) -> dict[str, int]:
    """Copy the keys a restoring process needs (``tiered.storage.partial``) of a merged root
    into a database of their own, each checked against the key index."""
    expect: dict[str, list[Any]] = job["keys"]
    _copy(_open(job["src"], context), job["dest"], sorted(expect), context, expect=expect)
    return {"keys": len(expect), "bytes": sum(int(v[0]) for v in expect.values())}


def run(jobs: list[dict[str, Any]]) -> list[Any]:
    import tensorstore as ts

    context = ts.Context()
    ops = {"index": _index, "build": _build, "rebuild": _rebuild, "copy": _copy_keys}
    return [ops[job["op"]](job, context) for job in jobs]


def main() -> int:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        print("tensorstore is not installed: install tiered-checkpoint[merge]", file=sys.stderr)
        return 3
    json.dump(run(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
