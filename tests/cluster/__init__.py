"""Tests of active/standby HA: the lease, journal replication, and the node's role state machine."""
