"""Server-side TLS settings: one `ssl.SSLContext` from a certificate, its key and an optional client CA.

The names follow RabbitMQ's `ssl_options` (certfile, keyfile, cacertfile, fail_if_no_peer_cert), which
is what operators of the brokers we replace already know. Loading errors become a ValueError that
names the file, so the config layer can refuse a bad config at start with the reason.

Must not import: asyncio, the broker core, storage, cluster, any protocol package.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_ssl_context(
    certfile: str | Path,
    keyfile: str | Path | None = None,
    *,
    cacertfile: str | Path | None = None,
    fail_if_no_peer_cert: bool = True,
    password: str | None = None,
) -> ssl.SSLContext:
    """An SSLContext for a TLS listener.

    `certfile` holds the server certificate (followed by its chain, if any); `keyfile` its private key
    (None: the key is in `certfile`). With `cacertfile`, clients are asked for a certificate signed by
    one of those CAs: required when `fail_if_no_peer_cert` (RabbitMQ's verify_peer +
    fail_if_no_peer_cert=true), else optional, but verified when sent. Without it, none is asked for.
    TLS 1.2 is the oldest version offered (RFC 8996 retires 1.0 and 1.1).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client could otherwise make the server redo expensive handshakes at will.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(certfile, keyfile, password)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load certificate {certfile} / key {keyfile or certfile}: {exc}") from exc
    if cacertfile is not None:
        try:
            context.load_verify_locations(cafile=cacertfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load client CA certificates {cacertfile}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if fail_if_no_peer_cert else ssl.CERT_OPTIONAL
    return context
