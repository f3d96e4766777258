"""Several corral replicas as one balancer, sharing state through Redis (``[cluster]``).

``Cluster`` (corral.cluster.cluster) is the entry point; its parts, a module each: the link
to Redis with a deadline on every call (link), the Lua scripts (lua), fleet-wide slots (slots),
who waits most urgently (urgency), control state (control), rate limits (limits) and the
leader lock (leader).
"""

from corral.cluster.cluster import Cluster, ClusterCollector
from corral.cluster.link import ClusterUnavailableError
from corral.cluster.slots import SlotLease

__all__ = ["Cluster", "ClusterCollector", "ClusterUnavailableError", "SlotLease"]
