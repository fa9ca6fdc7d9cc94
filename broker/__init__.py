"""polybroker's core (exchanges, queues, routing; no sockets, no protocol knowledge) and its
composition root, configuration and command line (docs/architecture.md).

Must not import: protocols, cluster (only the composition root and the CLI may, lazily).
"""
