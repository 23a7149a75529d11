"""Peer replication between nodes: who sends to whom, how a request proves it comes from the
job, and the client side of the transport (``daemon.peer_server`` serves it).

Each node's daemon sends its newest committed local step to its partners: the next node in a
ring by default, or the ranks ``tiered.peers`` (or orbax's ``peer-ranks`` in
``replicator.yaml``) names. A partner keeps it in its peer store (``tiered.storage.replicas``).
When a node comes back empty, it asks its partners for its own steps before the restore
agreement (``recover_own``), so the agreement sees them as local again.

The transport is plain HTTP between the daemons, on ``tiered.peer_listen_address``:

    GET /v1/replicas/<rank>         the replicas of node <rank> held here (JSON)
    GET /v1/replicas/<rank>/<step>  one of them, as the replica stream
    PUT /v1/replicas/<rank>/<step>  store one (the body is the replica stream)

Every request is signed with the job's shared secret (``tiered.peer_secret_file``), for one
receiver, once (``tiered.peerauth``: peer protocol v2); the receiver refuses any other request,
and a rank that is not the path's: a node may write and read its own replicas only. The replica
header (the manifest) carries its own HMAC, written by the owner and checked by the owner again
when it reads the copy back, so a peer cannot pass off another manifest; every file is checked
against that manifest's size and checksums as it arrives, on both sides.
"""

from tiered.peerauth import AUTH_HEADER, SIG_HEADER, PeerAuth
from tiered.peering.client import Held, PeerClient, header_for
from tiered.peering.partners import (
    MIN_SECRET_BYTES,
    listen_address,
    load_secret,
    partners,
    peer_address,
)
from tiered.peering.recovery import Recovered, clients_for, recover_own

__all__ = [
    "AUTH_HEADER",
    "MIN_SECRET_BYTES",
    "SIG_HEADER",
    "Held",
    "PeerAuth",
    "PeerClient",
    "Recovered",
    "clients_for",
    "header_for",
    "listen_address",
    "load_secret",
    "partners",
    "peer_address",
    "recover_own",
]
