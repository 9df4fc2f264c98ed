"""Ops views: stats with a real agent reply, /metrics and /healthz over HTTP, redacted logs."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
from datetime import timedelta

from sqlalchemy import select

from gateway.app import App
from gateway.logs import JsonFormatter, RedactingFilter, redact
from gateway.metrics import start_http
from gateway.models import Delivery, Ticket
from gateway.smtp_server import Handler, start_listeners
from gateway.spool import Spool
from gateway.stats import compute
from gateway.tickets import set_assignee

from conftest import Clock, mail, receive
from services import free_port


async def test_stats_count_tickets_first_responses_and_the_leaderboard(
    app: App, clock: Clock
) -> None:
    await receive(app, mail(message_id="s1@customer.org"), rcpt="support@example.com")
    await receive(app, mail(message_id="s2@customer.org"), rcpt="trialsupport@example.com")
    async with app.sessions() as session, session.begin():
        ticket = (await session.execute(select(Ticket).where(Ticket.ref == "SG-1"))).scalar_one()
        set_assignee(session, ticket, "sam@example.com", now=clock(), actor="test")
    clock.advance(minutes=10)
    await receive(
        app, mail(message_id="s3@customer.org", headers={"In-Reply-To": "<s1@customer.org>"})
    )
    async with app.sessions() as session:
        note = (
            await session.execute(
                select(Delivery).where(
                    Delivery.kind == "agent_notification", Delivery.recipient == "sam@example.com"
                )
            )
        ).scalar_one()
    parsed = email.message_from_bytes(note.data, policy=email.policy.default)
    token_address = parsed["Reply-To"].addresses[0].addr_spec
    clock.advance(minutes=20)
    await receive(
        app,
        mail(
            sender="Sam <sam@example.com>",
            to=token_address,
            subject="Re: Help",
            body="#solve\r\nThis is fixed now.\r\n",
            headers={"In-Reply-To": f"<{note.message_id}>"},
        ),
        rcpt=token_address,
        mail_from="sam@example.com",
    )
    report = await compute(app, since=clock() - timedelta(days=7))
    assert report["new_tickets"] == {"total": 2, "by_queue": {"support": 1, "trial": 1}}
    assert report["first_response_minutes"]["median"] == 30.0
    assert report["solve_minutes"]["count"] == 1
    assert report["waiting_on_us"]["total"] == 1
    (sam,) = report["agents"]
    assert sam == {
        "agent": "sam@example.com",
        "replies": 1,
        "solved": 1,
        "median_first_response_minutes": 30.0,
    }


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_and_health_over_http(app: App, backend: str) -> None:
    spool = Spool(app.sessions, clock=app.clock)
    writer = asyncio.create_task(spool.run())
    listeners = await start_listeners(app.config, Handler(app.config, spool))
    port = free_port()
    http = await start_http(app, f"127.0.0.1:{port}", listeners=listeners)
    try:
        await receive(app, mail())
        status, body = await http_get(port, "/metrics")
        assert status == 200
        assert "supportgate_received_total 1" in body
        assert "supportgate_processed_total 1" in body
        assert 'supportgate_deliveries{status="queued"} 2' in body
        assert "supportgate_processing_seconds_count 1" in body
        assert await http_get(port, "/healthz") == (200, "ok\n")
        for server in listeners:
            server.close()
        assert (await http_get(port, "/healthz"))[0] == 503
        assert (await http_get(port, "/nope"))[0] == 404
    finally:
        http.close()
        writer.cancel()


def test_logs_redact_addresses_and_secrets_and_can_be_json() -> None:
    assert redact("from jane.doe@customer.org to support@example.com") == (
        "from j***@customer.org to s***@example.com"
    )
    assert redact("login password=hunter2 ok") == "login password=*** ok"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "mail from %s", ("bob@x.org",), None)
    RedactingFilter().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "mail from b***@x.org" and entry["level"] == "info"
