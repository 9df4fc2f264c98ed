"""What kind of mail this is, and why: the first question the pipeline asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config import Config
from parsing.model import ParsedMessage

Kind = Literal["customer", "agent", "staff-forward", "auto-reply", "bounce", "list"]


@dataclass(frozen=True, slots=True)
class Classification:
    kind: Kind
    reason: str

    @property
    def automatic(self) -> bool:
        """Mail that must never be answered nor change a ticket's status."""
        return self.kind in ("auto-reply", "bounce", "list")


def is_mailer_daemon(address: str) -> bool:
    local = address.rpartition("@")[0].lower()
    return local in ("mailer-daemon", "postmaster", "mail-daemon")


def classify(
    parsed: ParsedMessage,
    config: Config,
    *,
    mail_from: str | None,
    rcpt_tos: list[str],
    forward: bool = False,
    agent_verified: bool = False,
) -> Classification:
    """Bounce, automatic, list, agent, staff forward or customer; the reason says which signal."""
    to_bounce_address = any(not config.mailbox_for(r) and config.is_ours(r) for r in rcpt_tos)
    if parsed.bounce is not None and any(r.action != "delivered" for r in parsed.bounce.recipients):
        kind = "standard DSN" if parsed.bounce.standard else "non-standard bounce"
        return Classification("bounce", f"{kind} for {len(parsed.bounce.recipients)} recipient(s)")
    if to_bounce_address and (mail_from == "" or parsed.bounce is not None):
        return Classification("bounce", "sent to the bounce address")
    if parsed.automatic:
        if parsed.automatic.startswith("list:"):
            return Classification("list", parsed.automatic)
        return Classification("auto-reply", parsed.automatic)
    if mail_from == "":
        return Classification("auto-reply", "null-sender")
    sender = parsed.from_addr.addr if parsed.from_addr else ""
    if not sender:
        return Classification("customer", "no From address")
    if is_mailer_daemon(sender) or (mail_from and is_mailer_daemon(mail_from)):
        return Classification("auto-reply", "mailer-daemon")
    if config.is_ours(sender):
        return Classification("auto-reply", "from-our-own-address")
    if config.agent_for(sender) is not None and agent_verified and not forward:
        return Classification("agent", "verified agent")
    if forward and config.is_staff(sender):
        return Classification("staff-forward", "forward from staff")
    if config.agent_for(sender) is not None:
        return Classification("agent", "unverified: from an agent address, no check passed")
    return Classification("customer", "customer mail")
