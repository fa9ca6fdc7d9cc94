"""MQTT 3.1, 3.1.1 and 5.0: the sans-I/O codec (codec.py, packets.py, properties.py) and the session.

The codec turns bytes into the packet objects of packets.py and back; the session applies the
protocol's rules against the broker core. Nothing in this package touches a socket.
"""
