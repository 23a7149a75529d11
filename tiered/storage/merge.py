"""Merging a multi-node step's per-process OCDBT databases into one, on the durable tier.

Each node's process writes its shards into ``<item>/ocdbt.process_<i>/``, an OCDBT database of
its own, as a global orbax save does. A global checkpoint also has ``<item>/manifest.ocdbt``: a
root whose B-tree references every process's data files by relative path (orbax's
``ocdbt_utils.merge_ocdbt_per_process_files`` writes it). Node 0 writes the same root at commit
time, so plain orbax restores the step on any topology.

The merge runs in a child process (``python -m tiered.storage.merge``) that imports tensorstore
and nothing of jax or orbax: the daemon stays small (tensorstore alone is about 50 MB), and a
crash in native code costs one commit attempt, not the sidecar. It reads only B-tree nodes and
manifests (byte ranges), never array data, and writes a few small objects.

Replicated arrays are written by every process that holds a replica (tiered saves with
``replica_id=None`` so that each node's part restores on its own), so several children hold the
same keys. They hold the same bytes (a jax.Array's replicas are equal), and the merge makes the
choice explicit: children are copied highest rank first into one transaction, so for a key
several hold the lowest rank's entry is the last written, and the one that stays. One
transaction makes the merged root one new version with a few data files, whatever the node
count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tiered.errors import StorageError

MERGE_TIMEOUT_SECONDS = 600.0


class MergeUnavailable(StorageError):
    """The merge cannot run here (no tensorstore, or a backend tensorstore does not reach)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class MergeIncomplete(StorageError):
    """The merged root lacks keys the nodes' indexes name: a node did not upload what its plan
    gave it. Retrying does not help; the step must not commit."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


def kvstore_spec(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The tensorstore kvstore of a durable URL's folder (``file://``, ``gs://``, ``s3://``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", url
    opts = storage_options or {}
    if scheme == "file":
        return {"driver": "file", "path": rest.rstrip("/") + "/"}
    bucket, _, path = rest.partition("/")
    path = path.strip("/") + "/" if path.strip("/") else ""
    if scheme in ("gs", "gcs"):
        return {"driver": "gcs", "bucket": bucket, "path": path}
    if scheme in ("s3", "s3a"):
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
        client = opts.get("client_kwargs") or {}
        endpoint = opts.get("endpoint_url") or client.get("endpoint_url")
        if endpoint:
            spec["endpoint"] = endpoint
        region = client.get("region_name") or opts.get("region_name")
        if region:
            spec["aws_region"] = region
        elif endpoint:
            spec["aws_region"] = "us-east-1"
        if opts.get("anon"):
            spec["aws_credentials"] = {"type": "anonymous"}
        return spec
    raise MergeUnavailable(f"tensorstore has no driver for {scheme}:// URLs")


def child_env(storage_options: dict[str, Any] | None) -> dict[str, str]:
    env = dict(os.environ)
    opts = storage_options or {}
    if opts.get("key") and opts.get("secret"):  # s3fs's names; tensorstore reads the env
        env["AWS_ACCESS_KEY_ID"] = str(opts["key"])
        env["AWS_SECRET_ACCESS_KEY"] = str(opts["secret"])
        if opts.get("token"):
            env["AWS_SESSION_TOKEN"] = str(opts["token"])
    return env


def run_child(
    module: str,
    jobs: list[dict[str, Any]],
    storage_options: dict[str, Any] | None,
    *,
    timeout: float,
    what: str,
) -> subprocess.CompletedProcess[str]:
    """Run a tensorstore child (``python -m MODULE``) on ``jobs`` (JSON on its stdin), with the
    store's credentials in its environment; a child that outlives ``timeout`` is a transient
    ``StorageError`` naming ``what`` it was doing."""
    try:
        return subprocess.run(
            [sys.executable, "-m", module],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            env=child_env(storage_options),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what} took over {timeout:.0f} s", transient=True) from None


def merge_roots(
    roots: list[tuple[str, list[str]]],
    storage_options: dict[str, Any] | None,
    *,
    timeout: float = MERGE_TIMEOUT_SECONDS,
    expect: dict[str, list[str]] | None = None,
) -> None:
    """Write a merged OCDBT root at each ``(root URL, child folders in rank order)``. With
    ``expect`` (root URL -> keys: a deduplicated step's), the merged root must hold every key
    named, else ``MergeIncomplete``."""
    jobs = [
        {
            "base": kvstore_spec(root, storage_options),
            "children": children,
            "expect": (expect or {}).get(root),
        }
        for root, children in roots
    ]
    out = run_child(
        "tiered.storage.merge",
        jobs,
        storage_options,
        timeout=timeout,
        what="merging the OCDBT roots",
    )
    tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
    if out.returncode == 3:
        raise MergeUnavailable(tail)
    if out.returncode == 4:
        raise MergeIncomplete(tail)
    if out.returncode != 0:
        raise StorageError(f"merging the OCDBT roots failed: {tail}", transient=True)


def merge_into(base: dict[str, Any], children: list[str], context: Any) -> None:
    """Write the merged OCDBT root at the kvstore ``base`` from its ``children`` (folders under
    it, in rank order)."""
    import tensorstore as ts

    def kv(sub: str) -> Any:
        spec = {**base, "path": base["path"] + (sub.rstrip("/") + "/" if sub else "")}
        return ts.KvStore.open({"driver": "ocdbt", "base": spec}, context=context).result()

    # One transaction for all children, as orbax's own merge: one commit writes one new
    # version of the root (a transaction per child wrote N versions and N data files,
    # which node 0 then read back, each commit rereading the root's manifest: at 1,024
    # nodes that was most of the commit). Copied one after the other, highest rank
    # first, so that for a key several children hold, the lowest rank's entry is the
    # last write in the transaction, and the one that stays.
    parent = kv("").with_transaction(txn := ts.Transaction(atomic=True))
    for child in reversed(children):
        kv(child).experimental_copy_range_to(parent).result()
    txn.commit_async().result()


def _merge(jobs: list[dict[str, Any]]) -> None:
    import tensorstore as ts

    context = ts.Context()
    for job in jobs:
        merge_into(job["base"], job["children"], context)
        expect = job.get("expect")
        if expect:
            _check_keys(job["base"], expect, context)


def _check_keys(base: dict[str, Any], expect: dict[str, int], context: Any) -> None:
    """Every key the nodes' indexes name is in the merged root: each node that followed its
    plan uploaded every key it was given."""
    import tensorstore as ts

    root = ts.KvStore.open({"driver": "ocdbt", "base": base}, context=context).result()
    have = {k.decode("latin-1") for k in root.list().result()}
    lost = sorted(set(expect) - have)
    if lost:
        print(
            f"the merged root lacks {len(lost)} key(s) the nodes hold, first {lost[0]!r}",
            file=sys.stderr,
        )
        sys.exit(4)


def main() -> int:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        print(
            "tensorstore is not installed: install tiered-checkpoint[merge] beside the daemon",
            file=sys.stderr,
        )
        return 3
    _merge(json.load(sys.stdin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
