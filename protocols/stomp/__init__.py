"""STOMP 1.0, 1.1 and 1.2: the sans-I/O frame codec (codec.py) and the protocol session built on it.

Must not import: asyncio, storage, cluster, other protocol packages.
"""
