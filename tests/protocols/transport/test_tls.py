"""TLS listeners (and WSS) with certificates from tests/certs.py, on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from protocols.transport.driver import ConnectionRegistry
from protocols.transport.listeners import Listener, start_listener
from protocols.transport.tls import server_ssl_context
from tests.certs import CertificateSet, make_certificates
from tests.protocols.transport import LOOPS, LoopFactory, Probe, run

pytestmark = LOOPS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    """Certificates from another CA, which the server does not trust."""
    return make_certificates(tmp_path_factory.mktemp("stranger"), ca_name="some other CA")


async def serve_tls(probe: Probe, context: ssl.SSLContext, kind: str = "stream") -> Listener:
    factories = {"mqtt": probe.factory()}
    return await start_listener(
        "test-tls", "127.0.0.1", 0, factories, registry=ConnectionRegistry(), ssl_context=context, kind=kind
    )


async def echo_over_tls(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(b"secret")
        return await reader.readexactly(6)
    finally:
        writer.close()


def test_tls_echo(loop_factory: LoopFactory, certs: CertificateSet) -> None:
    async def main() -> None:
        probe = Probe()
        listener = await serve_tls(probe, server_ssl_context(certs.server_cert, certs.server_key))
        assert listener.transport_name == "tls"
        assert await echo_over_tls(listener.port, certs.client_context(with_client_cert=False)) == b"SECRET"
        conn = probe.sessions[0].connection
        assert conn.transport_name == "tls"
        assert conn.is_loopback and conn.peer.startswith("127.0.0.1:")
        await probe.until(lambda: probe.sessions[0].lost)
        listener.close()

    run(loop_factory, main())


async def rejected(port: int, context: ssl.SSLContext) -> bool:
    """True when the server refuses the TLS session (during the handshake or right after, in TLS 1.3)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
    except (ssl.SSLError, ConnectionResetError):
        return True
    try:
        writer.write(b"hello")
        return await reader.read(5) == b""
    except (ssl.SSLError, ConnectionResetError):
        return True
    finally:
        writer.close()


def test_client_certificate_required(
    loop_factory: LoopFactory, certs: CertificateSet, stranger: CertificateSet
) -> None:
    async def main() -> None:
        probe = Probe()
        context = server_ssl_context(certs.server_cert, certs.server_key, cacertfile=certs.ca_cert)
        assert context.verify_mode == ssl.CERT_REQUIRED
        listener = await serve_tls(probe, context)
        assert await rejected(listener.port, certs.client_context(with_client_cert=False))
        untrusted = certs.client_context(with_client_cert=False)
        untrusted.load_cert_chain(stranger.client_cert, stranger.client_key)
        assert await rejected(listener.port, untrusted)
        assert not probe.sessions
        assert await echo_over_tls(listener.port, certs.client_context()) == b"SECRET"
        assert len(probe.sessions) == 1
        listener.close()

    run(loop_factory, main())


def test_client_certificate_optional(loop_factory: LoopFactory, certs: CertificateSet) -> None:
    async def main() -> None:
        probe = Probe()
        context = server_ssl_context(
            certs.server_cert, certs.server_key, cacertfile=certs.ca_cert, fail_if_no_peer_cert=False
        )
        assert context.verify_mode == ssl.CERT_OPTIONAL
        listener = await serve_tls(probe, context)
        assert await echo_over_tls(listener.port, certs.client_context(with_client_cert=False)) == b"SECRET"
        assert await echo_over_tls(listener.port, certs.client_context()) == b"SECRET"
        listener.close()

    run(loop_factory, main())


def test_wss(loop_factory: LoopFactory, certs: CertificateSet) -> None:
    async def main() -> None:
        probe = Probe()
        listener = await serve_tls(
            probe, server_ssl_context(certs.server_cert, certs.server_key), "websocket"
        )
        assert listener.transport_name == "wss"
        client_context = certs.client_context(with_client_cert=False)
        async with connect(f"wss://localhost:{listener.port}/mqtt", ssl=client_context) as ws:
            await ws.send(b"over tls")
            assert await ws.recv() == b"OVER TLS"
            assert probe.sessions[0].connection.transport_name == "wss"
        await probe.until(lambda: probe.sessions[0].lost)
        listener.close()

    run(loop_factory, main())


def test_bad_certificate_files_are_reported_by_name(
    loop_factory: LoopFactory, certs: CertificateSet, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="missing.pem"):
        server_ssl_context(missing, certs.server_key)
    with pytest.raises(ValueError, match="server.pem"):
        server_ssl_context(certs.server_cert, certs.client_key)  # a key that does not match
    with pytest.raises(ValueError, match="missing.pem"):
        server_ssl_context(certs.server_cert, certs.server_key, cacertfile=missing)


def test_old_protocol_versions_are_not_offered(loop_factory: LoopFactory, certs: CertificateSet) -> None:
    context = server_ssl_context(certs.server_cert, certs.server_key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
