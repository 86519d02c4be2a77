"""Real Redis and PostgreSQL servers for the distributed tests, started on free loopback ports in temporary folders.

The servers themselves live in ``neuron/servers.py`` (``neuron bench`` starts them too); Debian's ``redis-server`` and
PostgreSQL 15 (``.ci/run`` installs them when missing). Both stop when the test session ends.
"""

from __future__ import annotations

from neuron.servers import (
    PgServer,
    RedisServer,
    free_port,
    postgres_server,
    redis_server,
    reset_postgres,
    wait_for_port,
)

__all__ = ["PgServer", "RedisServer", "free_port", "postgres_server", "redis_server", "reset_postgres",
           "wait_for_port"]
