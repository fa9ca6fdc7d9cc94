"""polybroker's core (exchanges, queues, routing; no sockets, no protocol knowledge) and its
composition root, configuration and command line (DESIGN.md §1, §6).

Must not import: protocols, cluster (only the composition root and the CLI may, lazily).
"""
