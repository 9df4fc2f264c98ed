"""`/healthz` and `/metrics` (Prometheus text format) on an optional port of `serve`.

Everything comes from the store at scrape time, so the front, its worker and every process of
a scale-out report the same figures.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import ColumnElement, Float, case, cast, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import intake
from gateway.app import App
from gateway.models import Delivery, RawMail

log = logging.getLogger(__name__)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _latency_seconds(dialect: str) -> ColumnElement[float]:
    """processed_at - received_at in seconds, in the backend's own date arithmetic."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", RawMail.processed_at - RawMail.received_at), Float)
    return (func.julianday(RawMail.processed_at) - func.julianday(RawMail.received_at)) * 86400.0


async def processing_histogram(session: AsyncSession) -> list[str]:
    """Time from the 250 to the end of processing, as a Prometheus histogram.

    Read from the store, so it covers every worker process, not just this one.
    """
    latency = _latency_seconds(session.get_bind().dialect.name)
    columns = [func.sum(case((latency <= bound, 1), else_=0)) for bound in BUCKETS]
    query = select(func.count(), func.coalesce(func.sum(latency), 0.0), *columns).where(
        RawMail.processed_at.is_not(None), RawMail.state.in_(("processed", "duplicate"))
    )
    row = (await session.execute(query)).one()
    count, total, *cumulative = row
    name = "supportgate_processing_seconds"
    lines = [f"# TYPE {name} histogram"]
    lines += [
        f'{name}_bucket{{le="{b}"}} {int(c or 0)}' for b, c in zip(BUCKETS, cumulative, strict=True)
    ]
    lines += [
        f'{name}_bucket{{le="+Inf"}} {int(count)}',
        f"{name}_sum {float(total):.6f}",
        f"{name}_count {int(count)}",
    ]
    return lines


async def render_metrics(app: App, *, listeners_up: bool) -> str:
    async with app.readers() as session:
        states = select(RawMail.state, func.count()).group_by(RawMail.state)
        raw: dict[str, int] = {k: v for k, v in (await session.execute(states)).all()}
        statuses = select(Delivery.status, func.count()).group_by(Delivery.status)
        out: dict[str, int] = {k: v for k, v in (await session.execute(statuses)).all()}
    unmoved = await intake.waiting(app)  # stored, not yet in raw_mail
    raw["received"] = raw.get("received", 0) + unmoved
    received = sum(raw.values())
    lines = [
        "# TYPE supportgate_received_total counter",
        f"supportgate_received_total {received}",
        "# TYPE supportgate_processed_total counter",
        f"supportgate_processed_total {raw.get('processed', 0) + raw.get('duplicate', 0)}",
        "# TYPE supportgate_quarantined gauge",
        f"supportgate_quarantined {raw.get('quarantined', 0)}",
        "# TYPE supportgate_backlog gauge",
        f"supportgate_backlog {raw.get('received', 0)}",
        "# TYPE supportgate_deliveries gauge",
    ]
    for status in ("queued", "deferred", "sent", "failed", "bounced", "suppressed"):
        lines.append(f'supportgate_deliveries{{status="{status}"}} {out.get(status, 0)}')
    lines += [
        "# TYPE supportgate_outbox_depth gauge",
        f"supportgate_outbox_depth {out.get('queued', 0) + out.get('deferred', 0)}",
        "# TYPE supportgate_listeners_up gauge",
        f"supportgate_listeners_up {1 if listeners_up else 0}",
    ]
    async with app.readers() as session:
        lines += await processing_histogram(session)
    return "\n".join(lines) + "\n"


async def healthy(app: App) -> bool:
    try:
        async with app.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True
    except Exception as exc:
        log.error("health check: database unreachable: %s", type(exc).__name__)
        return False


async def start_http(app: App, listen: str, *, listeners: list[asyncio.Server]) -> asyncio.Server:
    """A tiny HTTP/1.0 server: enough for Prometheus and a load balancer's health check."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            up = bool(listeners) and all(s.is_serving() for s in listeners)
            if path == "/healthz":
                ok = up and await healthy(app)
                status, body = (
                    ("200 OK", "ok\n") if ok else ("503 Service Unavailable", "unhealthy\n")
                )
                ctype = "text/plain"
            elif path == "/metrics":
                status, body = "200 OK", await render_metrics(app, listeners_up=up)
                ctype = "text/plain; version=0.0.4"
            else:
                status, body, ctype = "404 Not Found", "not found\n", "text/plain"
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()

    host, _, port = listen.rpartition(":")
    return await asyncio.start_server(handle, host=host.strip("[]"), port=int(port))
