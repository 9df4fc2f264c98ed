"""`supportgate [--config PATH] COMMAND`: how people, cron and tests drive the gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError, ProgrammingError

from gateway import db
from gateway.app import App, build_app
from gateway.config import DEFAULT_CONFIG, Config, ConfigError, load

EX_OK, EX_FAIL, EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 0, 1, 2, 65, 75


class CommandError(Exception):
    """A problem worded for the person at the shell; printed as one line."""


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("SUPPORTGATE_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace, *, need_secret: bool = True) -> Config:
    return load(_config_path(args), need_secret=need_secret)


async def _with_app(config: Config, body: Callable[[App], Awaitable[int]], **kw: Any) -> int:
    app = build_app(config, **kw)
    try:
        current, head = await db.schema_revision(app.engine)
        if current != head:
            raise CommandError(
                f"the database is at schema {current or 'none'}, this version needs {head}: "
                "run `supportgate db upgrade`"
            )
        return await body(app)
    finally:
        await app.close()


def _run(config: Config, body: Callable[[App], Awaitable[int]], **kw: Any) -> int:
    return asyncio.run(_with_app(config, body, **kw))


# -- init / db ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir or ".")
    target.mkdir(parents=True, exist_ok=True)
    config_file = target / DEFAULT_CONFIG
    if config_file.exists():
        raise CommandError(f"{config_file} exists already; edit it or init another folder")
    example = resources.files("gateway").joinpath("config.example.toml").read_text("utf-8")
    config_file.write_text(example, encoding="utf-8")
    (target / "var").mkdir(exist_ok=True)
    print(f"wrote {config_file} and {target / 'var'}/")
    print("next: export SUPPORTGATE_SECRET=" + secrets.token_urlsafe(32))
    print(f"      supportgate --config {config_file} db upgrade")
    print(f"      supportgate --config {config_file} serve")
    return EX_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    config = _load(args, need_secret=False)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    db.upgrade(config.database_url)
    print("database schema is up to date")
    return EX_OK


# -- intake ------------------------------------------------------------------------------------


def _setup_logs(config: Config, *, verbose: bool) -> None:
    from gateway.logs import setup

    setup(
        level="debug" if verbose else config.gateway.log_level,
        json_lines=config.gateway.log_json,
        redact_addresses=config.gateway.log_redact,
    )


WORKER_NICE = 15  # measured against 5: serve accepted 1.8x as fast, processing no slower


def cmd_worker(args: argparse.Namespace) -> int:
    """Pipeline, outbox and timers: the process `serve` starts (or extra ones for scale-out)."""
    from gateway.serve import work

    config = _load(args)
    _setup_logs(config, verbose=args.verbose)
    if args.wake_fd is not None:
        # Started by `serve`: when both want the CPU, taking mail in (a sender is waiting for
        # the 250) goes before processing it (it is stored, and waits for nobody).
        os.nice(WORKER_NICE)

    async def body(app: App) -> int:
        await work(app, wake_fd=args.wake_fd)
        return EX_OK

    return _run(config, body)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.serve import serve, worker_argv

    config = _load(args)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _setup_logs(config, verbose=args.verbose)
    command = (
        worker_argv(str(config.path), verbose=args.verbose)
        if config.pipeline.worker_process
        else None
    )

    async def body(app: App) -> int:
        await serve(app, worker_command=command)
        return EX_OK

    return _run(config, body)


def cmd_ingest(args: argparse.Namespace) -> int:
    """The MTA pipe: 0 stored, 75 try again later, 65 refused (reason on stderr)."""
    from gateway.smtp_server import check_content
    from gateway.spool import raw_row, store_rows

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"supportgate: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    data = sys.stdin.buffer.read(config.smtp.max_message_bytes + 1)
    # An MTA hands us local line endings; store what SMTP would have carried.
    data = re.sub(rb"\r?\n", b"\r\n", data)
    recipient = args.recipient or os.environ.get("ORIGINAL_RECIPIENT") or config.mailbox[0].address
    if not config.is_ours(recipient):
        print(f"supportgate: refused: {recipient} is not one of our mailboxes", file=sys.stderr)
        return EX_DATAERR
    refusal = check_content(data, limit=config.smtp.max_message_bytes)
    if refusal:
        print(f"supportgate: refused: {refusal[10:]}", file=sys.stderr)
        return EX_DATAERR
    sender = args.sender if args.sender is not None else os.environ.get("SENDER")
    if sender is None:
        # No envelope sender given: take From's address rather than assume the null sender.
        from parsing.headers import addresses

        found = re.search(rb"^From:[ \t]*(.*(?:\r\n[ \t].*)*)", data, re.M | re.I)
        sender = ""
        if found:
            parsed = addresses([found.group(1).decode("utf-8", "replace")])
            sender = parsed[0].addr if parsed else ""

    async def body(app: App) -> int:
        row = raw_row(data, mail_from=sender, rcpt_tos=[recipient], source="pipe", now=app.clock())
        (raw_id,) = await store_rows(app.intake, [row])
        print(f"stored as {raw_id}", file=sys.stderr)
        return EX_OK

    try:
        return _run(config, body)
    except (OSError, OperationalError, ProgrammingError, CommandError) as exc:
        print(f"supportgate: temporary failure storing the message: {_short(exc)}", file=sys.stderr)
        return EX_TEMPFAIL


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def cmd_process(args: argparse.Namespace) -> int:
    from gateway.pipeline import process_pending

    async def body(app: App) -> int:
        counts = await process_pending(app)
        print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing to process")
        return EX_OK

    return _run(_load(args), body)


def cmd_inspect(args: argparse.Namespace) -> int:
    from gateway.inspect import inspect_message

    raw = sys.stdin.buffer.read()
    config = _load(args)

    async def body(app: App) -> int:
        report = await inspect_message(app, raw, recipient=args.recipient, sender=args.sender)
        if args.json:
            _print_json(report)
        else:
            for key, value in report.items():
                if key in ("new_text",):
                    print(f"{key}:\n  " + str(value).replace("\n", "\n  "))
                else:
                    print(f"{key}: {value}")
        return EX_OK

    return _run(config, body, parse_workers=0)


# -- tickets -----------------------------------------------------------------------------------


def cmd_tickets_list(args: argparse.Namespace) -> int:
    from gateway.models import Ticket
    from gateway.views import ticket_view

    async def body(app: App) -> int:
        async with app.readers() as session:
            query = select(Ticket).order_by(Ticket.id)
            if args.status:
                query = query.where(Ticket.status == args.status)
            if args.queue:
                query = query.where(Ticket.queue == args.queue)
            tickets = list((await session.execute(query)).scalars())
            if args.json:
                _print_json([await ticket_view(session, t, messages=False) for t in tickets])
                return EX_OK
            for t in tickets:
                print(
                    f"{t.ref:<10} {t.status:<8} {t.priority:<7} {t.queue:<10} "
                    f"{t.requester:<32} {t.subject[:60]}"
                )
        return EX_OK

    return _run(_load(args), body)


def cmd_tickets_show(args: argparse.Namespace) -> int:
    from gateway.tickets import get_ticket
    from gateway.views import ticket_view

    async def body(app: App) -> int:
        async with app.readers() as session:
            ticket = await get_ticket(session, args.ref)
            if ticket is None:
                raise CommandError(f"no ticket {args.ref}: `supportgate tickets list` shows them")
            view = await ticket_view(session, ticket)
        if args.json:
            _print_json(view)
            return EX_OK
        for key, value in view.items():
            if key != "messages":
                print(f"{key}: {value}")
        for m in view["messages"]:
            print(
                f"\n--- {m['created_at']} {m['direction']} {m['kind']} from {m['from']} "
                f"({m['threaded_by']})\n{m['subject']}\n{m['new_text']}"
            )
        return EX_OK

    return _run(_load(args), body)


def cmd_tickets_update(args: argparse.Namespace) -> int:
    from gateway import tickets as ops
    from gateway.notices import send_notice
    from parsing.model import Address

    actor = f"admin:{os.environ.get('USER', 'shell')}"

    async def body(app: App) -> int:
        now = app.clock()
        async with app.sessions() as session, session.begin():
            ticket = await ops.get_ticket(session, args.ref)
            if ticket is None:
                raise CommandError(f"no ticket {args.ref}: `supportgate tickets list` shows them")
            try:
                if args.status:
                    ops.set_status(session, app.config, ticket, args.status, now=now, actor=actor)
                if args.priority:
                    ops.set_priority(session, ticket, args.priority, now=now, actor=actor)
                if args.queue:
                    ops.set_queue(session, app.config, ticket, args.queue, now=now, actor=actor)
                if args.assign:
                    who = ops.resolve_agent(app.config, args.assign)
                    previous = ticket.assignee
                    # The requester hears of a re-assignment, not of the first owner.
                    if ops.set_assignee(session, ticket, who, now=now, actor=actor) and previous:
                        agent = app.config.agent_for(who)
                        await send_notice(
                            session,
                            app,
                            ticket,
                            "reassigned",
                            to=[
                                Address(ticket.reply_to or ticket.requester, ticket.requester_name)
                            ],
                            now=now,
                            automatic=False,
                            extra={"new_assignee_name": agent.name if agent else who},
                        )
            except ops.TicketError as exc:
                raise CommandError(str(exc)) from None
            print(
                f"{ticket.ref}: {ticket.status}, {ticket.priority}, {ticket.queue}, "
                f"{ticket.assignee or 'unassigned'}"
            )
        return EX_OK

    return _run(_load(args), body)


# -- ops ---------------------------------------------------------------------------------------


def _since(value: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhdw])", value.strip())
    if not match:
        raise CommandError(f"--since {value!r}: use a number and a unit, like 30m, 24h or 7d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def cmd_deliveries(args: argparse.Namespace) -> int:
    from gateway.models import Delivery, Ticket
    from gateway.views import delivery_view

    async def body(app: App) -> int:
        async with app.readers() as session:
            query = (
                select(Delivery, Ticket.ref)
                .outerjoin(Ticket, Ticket.id == Delivery.ticket_id)
                .order_by(Delivery.id)
            )
            if args.failed:
                query = query.where(Delivery.status.in_(("failed", "bounced")))
            if args.status:
                query = query.where(Delivery.status == args.status)
            if args.since:
                query = query.where(Delivery.created_at >= app.clock() - _since(args.since))
            if args.ticket:
                query = query.where(Ticket.ref == args.ticket.upper())
            if args.recipient:
                query = query.where(Delivery.recipient == args.recipient.lower())
            if args.kind:
                query = query.where(Delivery.kind == args.kind)
            rows = [delivery_view(d, ref) for d, ref in (await session.execute(query)).all()]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(
                    f"{r['id']:>6} {r['status']:<10} {r['attempts']:>2} {r['kind']:<22} "
                    f"{r['ticket'] or '-':<10} {r['recipient']:<32} {r['last_error'][:60]}"
                )
        return EX_OK

    return _run(_load(args), body)


def cmd_deliveries_retry(args: argparse.Namespace) -> int:
    from gateway.models import Delivery

    async def body(app: App) -> int:
        async with app.sessions() as session, session.begin():
            row = await session.get(Delivery, args.id)
            if row is None:
                raise CommandError(f"no delivery {args.id}: `supportgate deliveries` lists them")
            if row.status not in ("failed", "deferred", "bounced"):
                raise CommandError(
                    f"delivery {args.id} is {row.status}; only failed, deferred "
                    "or bounced deliveries can be retried"
                )
            now = app.clock()
            row.status, row.next_attempt_at, row.claimed_until = "queued", now, None
            row.deadline_at = max(row.deadline_at, now + timedelta(hours=1))
        print(f"delivery {args.id} queued again; `supportgate outbox flush` sends it now")
        return EX_OK

    return _run(_load(args), body)


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    from gateway.outbox import OutboxWorker

    async def body(app: App) -> int:
        worker = OutboxWorker(app)
        try:
            attempts = await worker.flush()
        finally:
            await worker.close()
        print(f"{attempts} delivery attempt(s)")
        return EX_OK

    return _run(_load(args), body)


def cmd_timers_run(args: argparse.Namespace) -> int:
    from gateway.timers import fire_due

    now = None
    if args.now:
        try:
            now = datetime.fromisoformat(args.now.replace("Z", "+00:00"))
        except ValueError:
            raise CommandError(
                f"--now {args.now!r} is not ISO 8601 (like 2026-01-31T09:00:00Z)"
            ) from None
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)

    async def body(app: App) -> int:
        fired = await fire_due(app, now=now)
        print(", ".join(f"{v} {k}" for k, v in fired.items()))
        return EX_OK

    return _run(_load(args), body)


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from gateway.models import RawMail
    from gateway.views import quarantine_view

    async def body(app: App) -> int:
        async with app.readers() as session:
            rows = (
                await session.execute(
                    select(RawMail).where(RawMail.state == "quarantined").order_by(RawMail.id)
                )
            ).scalars()
            views = [quarantine_view(r) for r in rows]
        if args.json:
            _print_json(views)
        else:
            for v in views:
                print(
                    f"{v['id']:>6} {v['received_at']} attempts={v['attempts']} {v['reason'][:90]}"
                )
        return EX_OK

    return _run(_load(args), body)


def cmd_quarantine_reprocess(args: argparse.Namespace) -> int:
    from gateway.models import RawMail
    from gateway.pipeline import process_pending

    async def body(app: App) -> int:
        async with app.sessions() as session, session.begin():
            result = await session.execute(
                update(RawMail)
                .where(RawMail.id == args.id, RawMail.state == "quarantined")
                .values(state="received", claimed_until=None)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise CommandError(
                    f"no quarantined message {args.id}: `supportgate quarantine list` shows them"
                )
        counts = await process_pending(app)
        print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        return EX_OK

    return _run(_load(args), body)


def cmd_forwards_list(args: argparse.Namespace) -> int:
    from gateway.models import RefusedForward
    from gateway.views import forward_view

    async def body(app: App) -> int:
        async with app.readers() as session:
            rows = [
                forward_view(r)
                for r in (
                    await session.execute(select(RefusedForward).order_by(RefusedForward.id))
                ).scalars()
            ]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(
                    f"{r['id']:>5} {r['state']:<9} {r['from']:<30} missing: "
                    f"{', '.join(r['missing']) or '-'}  {r['subject'][:50]}"
                )
        return EX_OK

    return _run(_load(args), body)


def cmd_suppressions_list(args: argparse.Namespace) -> int:
    from gateway.models import Suppression
    from gateway.views import iso

    async def body(app: App) -> int:
        async with app.readers() as session:
            rows = list(
                (
                    await session.execute(
                        select(Suppression)
                        .where(Suppression.expires_at > app.clock())
                        .order_by(Suppression.created_at)
                    )
                ).scalars()
            )
        if args.json:
            _print_json(
                [
                    {
                        "address": r.address,
                        "reason": r.reason,
                        "created_at": iso(r.created_at),
                        "expires_at": iso(r.expires_at),
                    }
                    for r in rows
                ]
            )
        else:
            for r in rows:
                print(f"{r.address:<40} until {iso(r.expires_at)}  {r.reason[:60]}")
        return EX_OK

    return _run(_load(args), body)


def cmd_suppressions_remove(args: argparse.Namespace) -> int:
    from gateway.models import Suppression

    async def body(app: App) -> int:
        async with app.sessions() as session, session.begin():
            row = await session.get(Suppression, args.address.lower())
            if row is None:
                raise CommandError(f"{args.address} is not suppressed")
            await session.delete(row)
        print(f"{args.address} may receive mail again")
        return EX_OK

    return _run(_load(args), body)


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.intake import waiting
    from gateway.models import Delivery, RawMail

    async def body(app: App) -> int:
        now = app.clock()
        async with app.readers() as session:

            async def count(*where: Any) -> int:
                return int(await session.scalar(select(func.count()).where(*where)) or 0)

            report: dict[str, Any] = {
                "backlog": await count(RawMail.state == "received") + await waiting(app),
                "quarantined": await count(RawMail.state == "quarantined"),
                "outbox_queued": await count(Delivery.status.in_(("queued", "deferred"))),
                "deliveries_failed_24h": await count(
                    Delivery.status.in_(("failed", "bounced")),
                    Delivery.created_at >= now - timedelta(hours=24),
                ),
                "bounced_24h": await count(
                    Delivery.status == "bounced", Delivery.created_at >= now - timedelta(hours=24)
                ),
                "listen": app.config.smtp.listen,
            }
            from gateway.imap_intake import imap_status

            report["imap"] = await imap_status(app)
            oldest = await session.scalar(
                select(func.min(Delivery.created_at)).where(
                    Delivery.status.in_(("queued", "deferred"))
                )
            )
            report["oldest_queued_at"] = oldest.isoformat() if oldest else None
        problems = []
        if report["quarantined"]:
            problems.append(f"{report['quarantined']} message(s) in quarantine")
        if report["deliveries_failed_24h"]:
            problems.append(f"{report['deliveries_failed_24h']} failed deliveries in 24 h")
        if oldest and now - oldest > timedelta(hours=1):
            problems.append("outbound mail has waited more than an hour")
        for account in report["imap"]:
            if account["last_error"]:
                problems.append(f"IMAP {account['account']}: {account['last_error']}")
        if report["backlog"] > 1000:
            problems.append(f"{report['backlog']} messages wait for processing")
        report["attention"] = problems
        if args.json:
            _print_json(report)
        else:
            for key, value in report.items():
                print(f"{key}: {value}")
            print("OK" if not problems else "NEEDS ATTENTION: " + "; ".join(problems))
        return EX_FAIL if problems else EX_OK

    return _run(_load(args), body)


def cmd_stats(args: argparse.Namespace) -> int:
    from gateway.stats import compute

    window = _since(args.since)

    async def body(app: App) -> int:
        report = await compute(app, since=app.clock() - window)
        if args.json:
            _print_json(report)
            return EX_OK
        new, fr, solve = (
            report["new_tickets"],
            report["first_response_minutes"],
            report["solve_minutes"],
        )
        print(
            f"since {report['since']}: {new['total']} new tickets "
            + " ".join(f"{q}={n}" for q, n in new["by_queue"].items())
        )
        for label, figures in (("first response", fr), ("solved", solve)):
            print(
                f"{label}: median {figures['median']} min, p90 {figures['p90']} min "
                f"({figures['count']} tickets)"
            )
        print(f"waiting on us: {report['waiting_on_us']['total']}")
        for row in report["agents"]:
            print(
                f"  {row['agent']:<32} replies {row['replies']:>4}  solved {row['solved']:>4}  "
                f"median first response {row['median_first_response_minutes']} min"
            )
        return EX_OK

    return _run(_load(args), body)


def cmd_hero(args: argparse.Namespace) -> int:
    from gateway.agents import hero_change, hero_rotation

    config = _load(args, need_secret=False)
    today = datetime.now(UTC).date()
    now, following = hero_rotation(config, today)
    if not now:
        raise CommandError("no agents configured: add [[agent]] entries and [hero] agents")
    print(f"now:  {now}\nnext: {following} (from {hero_change(config, today).isoformat()})")
    return EX_OK


# -- templates ---------------------------------------------------------------------------------


def cmd_templates_list(args: argparse.Namespace) -> int:
    from responders.render import Renderer

    config = _load(args, need_secret=False)
    folder = (
        config.base_dir / config.gateway.templates_dir if config.gateway.templates_dir else None
    )
    for name in Renderer(folder).names():
        print(name)
    return EX_OK


def cmd_templates_check(args: argparse.Namespace) -> int:
    from responders.render import SAMPLE_CONTEXT, Renderer

    config = _load(args, need_secret=False)
    folder = (
        config.base_dir / config.gateway.templates_dir if config.gateway.templates_dir else None
    )
    problems = Renderer(folder).check(SAMPLE_CONTEXT)
    for p in problems:
        print(f"{p.file}:{p.line or '?'}: {p.message}", file=sys.stderr)
    if problems:
        return EX_FAIL
    print("all templates render")
    return EX_OK


def _requester_of(context: dict[str, Any]) -> str:
    ticket = context.get("ticket")
    return str(ticket.get("requester", "")) if isinstance(ticket, dict) else ""


def cmd_templates_preview(args: argparse.Namespace) -> int:
    from gateway.notices import context_for
    from parsing.model import Address
    from responders.compose import compose
    from responders.render import SAMPLE_CONTEXT

    async def body(app: App) -> int:
        context: dict[str, Any] = dict(SAMPLE_CONTEXT)
        mailbox = app.config.mailbox[0]
        if args.ticket:
            from gateway.tickets import get_ticket

            async with app.readers() as session:
                ticket = await get_ticket(session, args.ticket)
                if ticket is None:
                    raise CommandError(f"no ticket {args.ticket}")
                real = context_for(app, ticket)
                context.update({k: v for k, v in real.items() if k != "extra"})
        if args.name not in app.renderer.names():
            raise CommandError(
                f"no template {args.name!r}: `supportgate templates list` names them"
            )
        notice = app.renderer.render(args.name, context)
        data = compose(
            notice,
            from_addr=Address(mailbox.address, mailbox.name),
            to=[Address(_requester_of(context) or "customer@example.net")],
            message_id=f"preview.{secrets.token_hex(6)}@{app.config.gateway.domain}",
            auto_submitted="auto-replied",
            date=app.clock(),
        )
        sys.stdout.write(data.decode("utf-8", "replace").replace("\r\n", "\n"))
        return EX_OK

    return _run(_load(args), body)


# -- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supportgate", description="An email-native support gateway."
    )
    parser.add_argument(
        "--config", help=f"config file (default ${{SUPPORTGATE_CONFIG}} or ./{DEFAULT_CONFIG})"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    add("init", cmd_init, "write a starter config and data folder").add_argument("dir", nargs="?")
    dbp = sub.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    add("upgrade", cmd_db_upgrade, "run migrations", dbp)
    add("serve", cmd_serve, "run SMTP listeners, pipeline, outbox and timers until SIGTERM")
    p = add(
        "worker",
        cmd_worker,
        "process mail, send the outbox and fire timers until SIGTERM "
        "(serve starts one; more may run against PostgreSQL)",
    )
    p.add_argument("--wake-fd", type=int, default=None, help=argparse.SUPPRESS)
    p = add(
        "ingest",
        cmd_ingest,
        "store one message from stdin (MTA pipe): 0 stored, 75 retry, 65 refused",
    )
    p.add_argument(
        "--recipient", help="envelope recipient (default $ORIGINAL_RECIPIENT or the first mailbox)"
    )
    p.add_argument("--sender", help="envelope sender (default $SENDER, else From's address)")
    add("process", cmd_process, "process all received-but-unprocessed mail, then exit")
    p = add(
        "inspect",
        cmd_inspect,
        "show what the gateway makes of one message on stdin, storing nothing",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--recipient", help="envelope recipient to assume")
    p.add_argument("--sender", help="envelope sender to assume")

    tp = sub.add_parser("tickets", help="list, show and update tickets").add_subparsers(
        dest="sub", required=True
    )
    p = add("list", cmd_tickets_list, "list tickets (every status unless filtered)", tp)
    p.add_argument("--status")
    p.add_argument("--queue")
    p.add_argument("--json", action="store_true")
    p = add("show", cmd_tickets_show, "one ticket and its messages", tp)
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p = add("update", cmd_tickets_update, "change a ticket (audited)", tp)
    p.add_argument("ref")
    p.add_argument("--status")
    p.add_argument("--priority")
    p.add_argument("--assign")
    p.add_argument("--queue")

    fp = sub.add_parser("forwards", help="refused staff forwards").add_subparsers(
        dest="sub", required=True
    )
    add("list", cmd_forwards_list, "forwards refused for missing context", fp).add_argument(
        "--json", action="store_true"
    )

    sp = sub.add_parser("suppressions", help="addresses that hard-bounced").add_subparsers(
        dest="sub", required=True
    )
    add("list", cmd_suppressions_list, "suppressed addresses", sp).add_argument(
        "--json", action="store_true"
    )
    add("remove", cmd_suppressions_remove, "allow mail to an address again", sp).add_argument(
        "address"
    )

    add(
        "status", cmd_status, "health at a glance; non-zero exit when something needs attention"
    ).add_argument("--json", action="store_true")
    add("hero", cmd_hero, "who triages unassigned hey@ mail now, and next")
    p = add("stats", cmd_stats, "volume, first-response and solve times, per-agent figures")
    p.add_argument("--since", default="7d", help="like 24h or 7d (default 7d)")
    p.add_argument("--json", action="store_true")
    timers = sub.add_parser("timers", help="nudges, auto-close, escalation").add_subparsers(
        dest="sub", required=True
    )
    add("run", cmd_timers_run, "fire everything due, then exit", timers).add_argument(
        "--now", help="ISO 8601 time"
    )
    outbox = sub.add_parser("outbox", help="outbound mail").add_subparsers(
        dest="sub", required=True
    )
    add("flush", cmd_outbox_flush, "deliver what is queued now, then exit", outbox)

    p = add("deliveries", cmd_deliveries, "the delivery log")
    p.add_argument("--failed", action="store_true", help="failed or bounced only")
    p.add_argument("--status")
    p.add_argument("--since", help="like 24h or 7d")
    p.add_argument("--ticket")
    p.add_argument("--recipient")
    p.add_argument("--kind")
    p.add_argument("--json", action="store_true")
    dsub = p.add_subparsers(dest="sub")
    add("retry", cmd_deliveries_retry, "queue a failed delivery again", dsub).add_argument(
        "id", type=int
    )

    qp = sub.add_parser("quarantine", help="mail that could not be processed").add_subparsers(
        dest="sub", required=True
    )
    add("list", cmd_quarantine_list, "quarantined mail and why", qp).add_argument(
        "--json", action="store_true"
    )
    add(
        "reprocess", cmd_quarantine_reprocess, "put one message through the pipeline again", qp
    ).add_argument("id", type=int)

    tm = sub.add_parser("templates", help="notice templates").add_subparsers(
        dest="sub", required=True
    )
    add("list", cmd_templates_list, "template names", tm)
    add("check", cmd_templates_check, "render every template against a sample ticket", tm)
    p = add("preview", cmd_templates_preview, "print a notice as a full mail", tm)
    p.add_argument("name")
    p.add_argument("--ticket")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else logging.INFO
        if args.command == "serve"
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (ConfigError, CommandError) as exc:
        print(f"supportgate: {exc}", file=sys.stderr)
        return EX_USAGE if isinstance(exc, ConfigError) else EX_FAIL
    except (OperationalError, ProgrammingError) as exc:
        print(
            f"supportgate: database error: {_short(exc.orig or exc)}; check [database] url "
            "and run `supportgate db upgrade`",
            file=sys.stderr,
        )
        return EX_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
