"""The local stack's default ports, and the addresses built from them: the one place they are written.

The services' settings, the CLI and SDK (``KILN_MASTER``'s default) and ``deploy/`` (what ``kiln up`` binds)
all fall back to these. They stay clear of the usual ports (NATS 4222, Postgres 5432, S3 8333, 8080) so that
a stack runs beside a system NATS or Postgres. ``kiln up`` records the ports it used in ``<state>/stack.json``
and hands them to the services as ``KILN_*`` settings; these are only the defaults. No I/O at import.
"""

from __future__ import annotations

from typing import Final

HOST: Final = "127.0.0.1"  # the local stack listens on loopback only

NATS_PORT: Final = 14222
NATS_MONITOR_PORT: Final = 18222
PG_PORT: Final = 15432
S3_PORT: Final = 18333
# SeaweedFS's other ports: this + 0..3 (master, volume, filer, admin HTTP), + 10000..10004 (their gRPC and
# S3's gRPC); see deploy.parts.weed_ports.
S3_PORTS_BASE: Final = 19330
HTTP_PORT: Final = 18080  # the gateway
# A NATS cluster (``kiln up --nats-cluster N``): route ports and the other servers' ports, 3 per server from here
# (deploy.parts.nats_node_ports).
NATS_CLUSTER_PORTS_BASE: Final = 14230

NATS_URL: Final = f"nats://{HOST}:{NATS_PORT}"
PG_DSN: Final = f"postgresql://kiln@{HOST}:{PG_PORT}/kiln"
S3_ENDPOINT: Final = f"{HOST}:{S3_PORT}"
MASTER_URL: Final = f"http://{HOST}:{HTTP_PORT}"
