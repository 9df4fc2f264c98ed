"""`supportgate inspect`: what the gateway makes of one message, and why, storing nothing."""

from __future__ import annotations

from typing import Any

from gateway.agents import verify_sender
from gateway.app import App
from gateway.classify import classify
from gateway.correlate import find_duplicate, find_thread
from gateway.forwards import check_forward
from gateway.models import RawMail
from parsing.mime import MessageRejected, display, parse_message


async def inspect_message(
    app: App, raw: bytes, *, recipient: str | None, sender: str | None
) -> dict[str, Any]:
    config = app.config
    rcpt = recipient or config.mailbox[0].address
    try:
        parsed = parse_message(raw)
    except MessageRejected as exc:
        return {"classification": "rejected", "reason": str(exc)}
    mail_from = (
        sender if sender is not None else (parsed.from_addr.addr if parsed.from_addr else "")
    )
    fake = RawMail(id=0, data=raw, rcpt_tos=[rcpt], mail_from=mail_from, source="inspect")
    report: dict[str, Any] = {
        "message_id": parsed.message_id,
        "from": parsed.from_addr.addr if parsed.from_addr else "",
        "from_display": display(parsed.from_addr),
        "to": [a.addr for a in parsed.to],
        "cc": [a.addr for a in parsed.cc],
        "subject": parsed.subject,
        "date": parsed.date.isoformat() if parsed.date else None,
        "in_reply_to": list(parsed.in_reply_to),
        "references": list(parsed.references),
        "new_text": parsed.new_text,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": len(a.data)}
            for a in parsed.attachments
        ],
        "defects": list(parsed.defects),
        "automatic": parsed.automatic or None,
    }
    async with app.readers() as session:
        agent = await verify_sender(session, app, fake, parsed)
        forward = check_forward(config, parsed) if config.is_staff(report["from"]) else None
        verdict = classify(
            parsed,
            config,
            mail_from=mail_from,
            rcpt_tos=[rcpt],
            forward=forward is not None,
            agent_verified=bool(agent),
        )
        report["classification"] = verdict.kind
        report["reason"] = verdict.reason
        if parsed.bounce is not None:
            report["bounce"] = {
                "recipients": [
                    {
                        "address": r.address,
                        "status": r.status,
                        "hard": r.hard,
                        "action": r.action,
                        "diagnostic": r.diagnostic,
                    }
                    for r in parsed.bounce.recipients
                ],
                "original_message_id": parsed.bounce.original_message_id or None,
            }
        if forward is not None:
            report["forward"] = {
                "style": forward.forward.style,
                "present": list(forward.context.present),
                "missing": list(forward.context.missing),
                "original_from": forward.forward.original_from.addr
                if forward.forward.original_from
                else None,
            }
        duplicate = await find_duplicate(session, parsed)
        thread = await find_thread(session, config, parsed, rcpt_tos=[rcpt])
        report["duplicate_of"] = duplicate.id if duplicate else None
        report["thread"] = {
            "ticket": thread.ticket.ref if thread.ticket else None,
            "threaded_by": thread.threaded_by,
            "follow_up_of": thread.follow_up_of.ref if thread.follow_up_of else None,
        }
        report["queue"] = (config.mailbox_for(rcpt) or config.mailbox[0]).queue
        await session.rollback()
    return report
