"""End-to-end failover tests of an active/standby pair in two simulated availability zones."""
