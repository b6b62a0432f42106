"""Create Kiln's streams and key-value buckets on a NATS (cluster) as its admin user, then exit.

What ``kiln up`` does for the local stack, for a cluster run elsewhere: the Kubernetes Job in
deploy/kubernetes/kiln.yaml runs it before the services start (they may not create streams). Settings:
``KILN_NATS_URL`` (every server, comma-separated), ``KILN_NATS_USER=admin``, ``KILN_NATS_PASSWORD`` or
``KILN_NATS_PASSWORD_FILE``, ``KILN_STREAM_REPLICAS`` (3 on a 3-node cluster). Idempotent: rerun after an
upgrade, it creates what a new version added and raises replicas, and changes nothing else.
"""

from __future__ import annotations

import asyncio

from services.runtime import BusSettings, configure_logging, connect_bus, read_settings


async def bootstrap(settings: BusSettings) -> None:
    """Connect as ``settings`` says and create whatever stream or bucket is missing."""
    async with connect_bus(settings, "bootstrap", ensure=True):
        pass


def main() -> None:
    """Entry point: settings from the environment."""
    configure_logging("bootstrap")
    asyncio.run(asyncio.wait_for(bootstrap(read_settings(BusSettings)), 120.0))


if __name__ == "__main__":
    main()
