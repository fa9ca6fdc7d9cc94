"""Tests of the durable store: the contract every backend meets, the encoding, crash safety."""
