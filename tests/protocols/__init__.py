"""Tests of the protocol packages and of the transport layer (mirrors protocols/)."""
