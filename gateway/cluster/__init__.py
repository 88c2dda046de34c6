"""Scale-out: one fair order shared by gateway processes through Redis.

``rule`` states the shared decisions in Python, ``scripts`` holds the same decisions as Lua run
atomically inside Redis (checked equal by a test), ``store`` the replica's batched link to them,
``dispatch`` the dispatcher that claims slots through it, ``metrics`` what Prometheus sees of
the link. Without a ``cluster:`` config section none of this is imported.
"""

from .dispatch import ClusterAdmission, ClusterDispatcher, default_replica_id
from .store import ClusterStore, ClusterUnavailable, make_store

__all__ = [
    "ClusterAdmission",
    "ClusterDispatcher",
    "ClusterStore",
    "ClusterUnavailable",
    "default_replica_id",
    "make_store",
]
