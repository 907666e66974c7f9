"""SSH connections read their socket 64 KiB at a time (``stream.narrow_reads``).

asyncio's read size is an attribute of its socket transport, not an API: these
tests fail if a Python upgrade moves it, and check that a stream read in
small pieces still arrives whole. Real asyncssh on 127.0.0.1, both ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import asyncssh

from snapper_zone.transfer.remote import ZoneClient
from snapper_zone.transfer.stream import SOCKET_READ, narrow_reads

STREAM = (3 << 20) + 12345  # several windows, not a multiple of any read


class _Sink(asyncssh.SSHServerSession[bytes]):
    def __init__(self, got: asyncio.Future[str]) -> None:
        self.got = got
        self.digest = hashlib.sha256()

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def exec_requested(self, command: str) -> bool:
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.digest.update(data)

    def eof_received(self) -> bool:
        self.got.set_result(self.digest.hexdigest())
        self.chan.exit(0)
        return False


class _Server(asyncssh.SSHServer):
    def __init__(self, conns: list[asyncssh.SSHServerConnection],
                 got: asyncio.Future[str]) -> None:
        self.conns, self.got = conns, got

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        narrow_reads(conn)  # as snapperd's server does
        self.conns.append(conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True

    def session_requested(self) -> _Sink:
        return _Sink(self.got)


async def test_both_ends_read_64_kib_and_the_stream_arrives_whole(tmp_path: Path) -> None:
    host = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "client"
    client_key.write_private_key(str(key_path))
    conns: list[asyncssh.SSHServerConnection] = []
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = await asyncssh.create_server(
        lambda: _Server(conns, got), "127.0.0.1", 0, server_host_keys=[host],
        encoding=None, line_editor=False)
    port = server.sockets[0].getsockname()[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} " + host.export_public_key().decode())
    try:
        # The product's client narrows its own connection.
        async with ZoneClient("127.0.0.1", port, key_path, known_hosts=known) as zone:
            assert zone.conn is not None
            [server_conn] = conns
            for conn in (zone.conn, server_conn):
                transport: Any = conn._transport  # asyncio's, private to asyncssh
                assert transport.max_size == SOCKET_READ
            data = os.urandom(STREAM)
            chan, _ = await zone.conn.create_session(asyncssh.SSHClientSession, "sink",
                                                     encoding=None)
            for i in range(0, len(data), 200_001):
                chan.write(data[i:i + 200_001])
            chan.write_eof()
            assert await asyncio.wait_for(got, 30) == hashlib.sha256(data).hexdigest()
    finally:
        server.close()
        await server.wait_closed()


def test_a_connection_without_the_attribute_is_left_alone() -> None:
    class Transport:
        pass

    class Conn:
        _transport = Transport()

    narrow_reads(object())
    conn = Conn()
    narrow_reads(conn)
    assert not hasattr(conn._transport, "max_size")
