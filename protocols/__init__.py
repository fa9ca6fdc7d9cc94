"""The protocol adapters: MQTT 3.1/3.1.1/5.0 (mqtt/), AMQP 0-9-1 (amqp091/), STOMP 1.0-1.2 (stomp/),
and the transport layer they all run on (transport/: TCP, TLS, WebSocket drivers and listeners).

Each protocol package is a triad, as RabbitMQ's plugins are: a sans-I/O codec (bytes <-> frames), a
session with the protocol's rules (frames <-> calls on the broker core), and, shared by all of
them, a driver that owns the socket. session.py is the contract between driver and session.

Must not import: storage, cluster. Only the composition root (broker/) imports this package.
"""
