"""DATA read in bulk (GatewaySMTP), over loopback: what gets stored, and aiosmtpd's loop beside it.

The bulk reader must hand the DATA hook exactly the bytes aiosmtpd's line-by-line loop would and
give the same replies, so the second half runs both servers through the same sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.app import App
from gateway.smtp_server import GatewaySMTP, Handler, start_listeners
from gateway.spool import Spool

from conftest import stored_raw

ENVELOPE = [b"MAIL FROM:<jane@customer.org>", b"RCPT TO:<support@example.com>", b"DATA"]
SMALL_LIMIT = 65536


class Client:
    """A session typed by hand: bytes go out exactly as written, replies come back whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        client = cls(*await asyncio.open_connection("127.0.0.1", port, limit=2**20))
        assert (await client.reply()).startswith(b"220")
        assert (await client.command(b"EHLO client.test")).startswith(b"250")
        return client

    async def reply(self) -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def command(self, line: bytes) -> bytes:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def send(self, data: bytes, *, pause: float = 0.0) -> None:
        """Write `data`; with a pause, a byte a write, so that each may arrive on its own."""
        pieces = [data[i : i + 1] for i in range(len(data))] if pause else [data]
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def mail(self, lines: bytes, *, pause: float = 0.0) -> bytes:
        """MAIL, RCPT, DATA, then `lines` as sent (dot-stuffed, ended): the reply to them."""
        for command in ENVELOPE:
            assert (await self.command(command))[:1] in (b"2", b"3")
        await self.send(lines, pause=pause)
        return await self.reply()

    async def close(self) -> None:
        assert (await self.command(b"QUIT")).startswith(b"221")
        self.writer.close()


async def stored(app: App) -> list[bytes]:
    return [row.data for row in await stored_raw(app)]


@pytest.fixture
async def small_listener(app: App) -> AsyncIterator[int]:
    """The `listener` fixture with a 64 KiB size limit, so that passing it is cheap."""
    smtp = dataclasses.replace(
        app.config.smtp, max_message_bytes=SMALL_LIMIT, listen=["127.0.0.1:0"]
    )
    config = dataclasses.replace(app.config, smtp=smtp)
    spool = Spool(app.intake, clock=app.clock)
    writer = asyncio.create_task(spool.run())
    servers = await start_listeners(config, Handler(config, spool))
    yield int(servers[0].sockets[0].getsockname()[1])
    for server in servers:
        server.close()
    writer.cancel()


# -- through our listener into the store -------------------------------------------------------

HEAD = b"From: jane@customer.org\r\nSubject: data\r\n\r\n"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b".\r\n", b""),
        (HEAD + b"..x\r\n..\r\n...\r\n.\r\n", HEAD + b".x\r\n.\r\n..\r\n"),
        (HEAD + b"end.\r\n. .\r\nx.\r\n.\r\n", HEAD + b"end.\r\n .\r\nx.\r\n"),
        (HEAD + b"x" * 998 + b"\r\n..\r\n.\r\n", HEAD + b"x" * 998 + b"\r\n.\r\n"),
    ],
    ids=["empty", "dot-stuffed", "lines-ending-in-a-dot", "longest-line-allowed"],
)
async def test_data_is_stored_unstuffed_and_byte_exact(
    app: App, listener: int, sent: bytes, kept: bytes
) -> None:
    client = await Client.connect(listener)
    assert (await client.mail(sent)).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [kept]


async def test_an_end_of_data_split_byte_by_byte_is_found(app: App, listener: int) -> None:
    client = await Client.connect(listener)
    body = HEAD + b"end.\r\n..\r\n"
    await client.send(b"".join(c + b"\r\n" for c in ENVELOPE))
    assert [await client.reply() for _ in ENVELOPE][-1].startswith(b"354")
    await client.send(body + b".\r\n", pause=0.002)
    assert (await client.reply()).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [HEAD + b"end.\r\n.\r\n"]


@pytest.mark.parametrize("end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r\r\n"])
async def test_only_crlf_dot_crlf_ends_data(app: App, listener: int, end: bytes) -> None:
    """A look-alike end stays in the message (which then has a bare CR or LF: 554)."""
    client = await Client.connect(listener)
    body = HEAD + b"hello" + end + b"MAIL FROM:<x@y.org>\r\n"
    assert (await client.mail(body + b".\r\n")).startswith(b"554 5.6.0")
    assert (await client.mail(HEAD + b"next\r\n.\r\n")).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [HEAD + b"next\r\n"]


async def test_a_line_over_the_limit_gets_500_after_the_end_and_the_session_goes_on(
    app: App, listener: int
) -> None:
    client = await Client.connect(listener)
    for command in ENVELOPE:
        await client.command(command)
    await client.send(HEAD + b"y" * 5000 + b"\r\nmore\r\n")
    with pytest.raises(TimeoutError):  # nothing is said before the end of data
        async with asyncio.timeout(0.3):
            await client.reply()
    await client.send(b".\r\n")
    assert await client.reply() == b"500 Line too long (see RFC5321 4.5.3.1.6)\r\n"
    assert (await client.mail(HEAD + b"next\r\n.\r\n")).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [HEAD + b"next\r\n"]


async def test_oversize_data_gets_552_and_the_session_goes_on(
    app: App, small_listener: int
) -> None:
    client = await Client.connect(small_listener)
    fits = HEAD + (b"z" * 78 + b"\r\n") * 800
    too_big = fits + b"w" * 998 + b"\r\n" + fits * 3
    assert (await client.mail(too_big + b".\r\n")).startswith(b"552 ")
    assert (await client.mail(fits + b".\r\n")).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [fits]


async def test_two_messages_pipelined_on_one_connection_stay_two(app: App, listener: int) -> None:
    client = await Client.connect(listener)
    one, two = HEAD + b"one\r\n..\r\n", HEAD + b"two.\r\n"
    commands = b"".join(c + b"\r\n" for c in ENVELOPE)
    await client.send(commands + one + b".\r\n" + commands + two + b".\r\n")
    replies = [await client.reply() for _ in range(8)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354", b"250"] * 2, replies
    await client.close()
    assert await stored(app) == [HEAD + b"one\r\n.\r\n", two]


async def test_a_5_mb_message_is_stored_byte_exact(app: App, listener: int) -> None:
    rng = random.Random(5)
    lines = [
        b"." * rng.randrange(3) + rng.randbytes(rng.randrange(0, 700)).hex().encode()[:990]
        for _ in range(8_000)
    ]
    kept = HEAD + b"".join(line + b"\r\n" for line in lines)
    assert 4_500_000 < len(kept) < app.config.smtp.max_message_bytes
    sent = kept.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    client = await Client.connect(listener)
    assert (await client.mail(sent)).startswith(b"250 2.0.0")
    await client.close()
    assert await stored(app) == [kept]


# -- beside aiosmtpd's own DATA loop -----------------------------------------------------------


class Recorder:
    """A DATA hook that keeps what it is handed and says 250."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.contents.append(envelope.original_content)
        return "250 OK"


class Pair:
    """aiosmtpd's SMTP and our GatewaySMTP, same options, each keeping what it was handed."""

    def __init__(self) -> None:
        self.recorders = {SMTP: Recorder(), GatewaySMTP: Recorder()}
        self.ports: dict[type[SMTP], int] = {}

    async def session(self, script: list[bytes], *, pause: float = 0.0) -> dict[str, bytes]:
        """Each server's whole side of one session: `script` written a piece at a time."""
        transcripts = {}
        for protocol, port in self.ports.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for piece in [b"EHLO pair.test\r\n", *script, b"QUIT\r\n"]:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(pause)
            transcripts[protocol.__name__] = await asyncio.wait_for(reader.read(), 30)
            writer.close()
        return transcripts


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    pair, loop, servers = Pair(), asyncio.get_running_loop(), []
    for protocol, recorder in pair.recorders.items():

        def build(protocol: type[SMTP] = protocol, recorder: Recorder = recorder) -> SMTP:
            return protocol(
                recorder, hostname="pair.test", data_size_limit=4000, enable_SMTPUTF8=True
            )

        server = await loop.create_server(build, host="127.0.0.1", port=0)
        pair.ports[protocol] = int(server.sockets[0].getsockname()[1])
        servers.append(server)
    yield pair
    for server in servers:
        server.close()


def envelope_and(lines: bytes) -> bytes:
    return b"".join(c + b"\r\n" for c in ENVELOPE) + lines


NEXT = envelope_and(b"Subject: next\r\n\r\nstill here\r\n.\r\n")
ROW = b"r" * 78 + b"\r\n"  # 80 bytes; 50 of them fill the 4000-byte limit exactly


@pytest.mark.parametrize(
    "lines",
    [
        b".\r\n",
        b"..\r\n.\r\n",
        b"..x\r\n.y\r\n...\r\nend.\r\n\r\n.\r\n",
        b"a\n.\nb\r\n.\n\r\n\r.\r\n.\r\r\n.\r\n",
        b"x" * 999 + b"\r\n.\r\n",  # 1001 bytes with CRLF: the longest line allowed
        b"x" * 1000 + b"\r\n.\r\n",  # one over: too long, though the reader took it whole
        b"x" * 1001 + b"\r\n.\r\n",
        b"x" * 1002 + b"\r\n.\r\n",  # the first to overrun aiosmtpd's reader
        b"." + b"x" * 999 + b"\r\n.\r\n",  # too long as sent, though not once unstuffed
        b"x" * 5000 + b"\r\n.\r\n",
        b"x" * 2000 + b"\r" + b"\r\n.\r\n",
        ROW * 50 + b".\r\n",  # exactly at the size limit
        ROW * 50 + b"x\r\n.\r\n",  # one line over it
        ROW * 49 + b"x" * 1000 + b"\r\n.\r\n",  # a too-long line passes the limit: 552
        ROW * 49 + b"x" * 1001 + b"\r\n.\r\n",  # the longest the reader takes whole: 552
        ROW * 49 + b"x" * 1002 + b"\r\n.\r\n",  # ... but one overrunning the reader: 500
        ROW * 30 + b"x" * 1000 + b"\r\n" + ROW * 30 + b".\r\n",  # too long first: 500
        ROW * 51 + b"x" * 3000 + b"\r\n" + ROW * 40 + b".\r\n",  # too much first: 552
        ROW * 49 + b"x" * 30_000 + b"\r\n.\r\n",  # a long last line, drained
        ROW * 200 + b".\r\n",
    ],
)
@pytest.mark.parametrize("pause", [0.0, 0.002], ids=["at-once", "byte-pieces"])
async def test_same_replies_and_bytes_as_aiosmtpd(pair: Pair, lines: bytes, pause: float) -> None:
    script = [envelope_and(lines), NEXT]
    if pause:  # byte by byte when short, else in pieces of 97 bytes that split CRLFs too
        step = 1 if len(lines) < 200 else 97
        pieces = [lines[i : i + step] for i in range(0, len(lines), step)]
        script = [envelope_and(b""), *pieces, NEXT]
    transcripts = await pair.session(script, pause=pause)
    assert transcripts["GatewaySMTP"] == transcripts["SMTP"]
    assert transcripts["SMTP"].endswith(b"\r\n250 OK\r\n221 Bye\r\n")  # the next mail too
    assert pair.recorders[GatewaySMTP].contents == pair.recorders[SMTP].contents


TOKENS = [b"x", b"hello", b"y" * 70, b"z" * 600, b"\r\n", b"\r\n", b"\r\n", b".", b"..", b"\r"]
TOKENS += [b"\n", b"\x00", b"\r\n.", b"w" * 998]


def random_lines(rng: random.Random) -> bytes:
    """Dot-stuffed-or-not DATA lines ended by their first CRLF.CRLF, up to ~6 KB."""
    while True:
        body = b"".join(rng.choices(TOKENS, k=rng.randrange(0, 40)))
        lines = body + b"\r\n.\r\n" if body else b".\r\n"
        if (b"\r\n" + lines).find(b"\r\n.\r\n") == len(lines) - 3:
            return lines


async def test_random_data_gets_the_same_replies_and_bytes_as_aiosmtpd(pair: Pair) -> None:
    rng = random.Random(20260302)
    for _ in range(150):
        lines = random_lines(rng)
        cuts = rng.sample(range(1, len(lines)), min(len(lines) - 1, rng.randrange(4)))
        cuts = sorted({*cuts, len(lines) - rng.randrange(1, min(6, len(lines)))})  # in the end
        pieces = [lines[a:b] for a, b in zip([0, *cuts], [*cuts, len(lines)], strict=True)]
        script = [envelope_and(b""), *pieces, NEXT]
        transcripts = await pair.session(script, pause=0.001)
        assert transcripts["GatewaySMTP"] == transcripts["SMTP"], lines
    assert pair.recorders[GatewaySMTP].contents == pair.recorders[SMTP].contents


@pytest.mark.parametrize(
    "pieces",
    [
        [b"y" * 1500 + b"\rx.\r\n", b"more\r\n.\r\n"],  # a piece read ends in a bare CR
        [b"y" * 1500 + b"\r\nab.\r\n", b".\r\n"],
        [b"y" * 1500 + b"\r\n\r\n.\r", b"\n"],  # the end comes a byte at a time after a read
    ],
)
async def test_reads_cut_near_an_end_of_data_as_aiosmtpd(pair: Pair, pieces: list[bytes]) -> None:
    """Pieces past the reader's limit, cut so that its reads stop inside a would-be end."""
    transcripts = await pair.session([envelope_and(b""), *pieces, NEXT], pause=0.05)
    assert transcripts["GatewaySMTP"] == transcripts["SMTP"]
    assert pair.recorders[GatewaySMTP].contents == pair.recorders[SMTP].contents
