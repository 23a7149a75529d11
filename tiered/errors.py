"""The exception tree. Every error tiered raises on purpose is a ``TieredError``.

    TieredError
    ├── ConfigError        a setting is missing, malformed or inconsistent (names the key)
    │     └── ReplicatorConfigError   orbax's replicator.yaml is unusable
    ├── AlreadyRunning     another process holds the directory lock (a daemon, a trainer)
    ├── LayoutError        a name or entry on disk is not what the protocol allows
    ├── ChecksumMismatch   bytes on a tier differ from the step's manifest
    ├── StorageError       a tier could not be read or written
    │     .transient = True   worth retrying (timeouts, 5xx, connection resets, a full disk)
    │     .transient = False  retrying will not help (auth, a rejected name, a missing bucket)
    │     ├── NotFound     an object, a file or a bucket is not there (also a FileNotFoundError)
    │     └── PeerRefused  a peer refused a request, or a request from a peer was refused
    │           │          (no secret, a wrong one, a replay, another node's replica)
    │           └── PeerProtocolMismatch  the peer speaks another peer protocol version
    └── CommitError        a step could not be committed or restored as a whole
          ├── StepExists        the durable step is already committed, with other content
          ├── StepUnreadable    the step a restore named fails to verify or to load
          └── AgreementTimeout  the nodes did not agree on a restore step in time

fsspec, OS and network errors are translated into ``StorageError`` at the storage boundary
(``tiered.storage``), so callers above it never see backend-specific exception types.
"""

from __future__ import annotations


class TieredError(Exception):
    """Root of every error tiered raises on purpose."""


class ConfigError(TieredError):
    """A configuration value is missing, malformed or inconsistent."""


class ReplicatorConfigError(ConfigError):
    """``replicator.yaml`` is unusable; the reason goes to ``replicator.failed``."""


class AlreadyRunning(TieredError):
    """Another process holds the directory lock."""


class LayoutError(TieredError):
    """Something on disk does not follow the on-disk protocol."""


class ChecksumMismatch(TieredError):
    """A file's size or crc32c differs from its manifest entry."""


class StorageError(TieredError):
    """A tier could not be read or written."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class NotFound(StorageError, FileNotFoundError):
    """Something a tier was asked for is not there. It is a ``FileNotFoundError`` too, so code
    that asks "is it there?" reads naturally; writing to a bucket that does not exist raises it."""

    def __init__(self, message: str) -> None:
        StorageError.__init__(self, message, transient=False)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PeerRefused(StorageError):
    """A peer's request, or a request to a peer, was refused: it was not signed with the job's
    secret, or asked for what that node may not read or write."""

    def __init__(self, message: str) -> None:
        StorageError.__init__(self, message, transient=False)


class PeerProtocolMismatch(PeerRefused):
    """The other node's daemon speaks another version of the peer protocol (another tiered
    version): the message names both."""


class CommitError(TieredError):
    """A step could not be committed, or restored, as a whole."""


class StepExists(CommitError):
    """The durable step is committed already, with other content: it is never overwritten."""


class StepUnreadable(CommitError):
    """The step a restore asked for by number fails to verify or to load: named, it is never
    swapped for an older one (only a restore of "the newest good step" falls back)."""


class AgreementTimeout(CommitError):
    """The nodes did not agree on a restore step in time (a node is down, or never asked)."""
