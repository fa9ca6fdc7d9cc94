"""AMQP 0-9-1 protocol adapter: the sans-I/O frame codec (codec.py and the modules it uses) and the session.

Must not import: asyncio, storage, cluster, other protocol packages.
"""
