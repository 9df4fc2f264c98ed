"""The schema: raw mail first, then tickets, messages, the outbox and the audit trail.

Alembic owns the schema (gateway/migrations); these classes describe it for queries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite rowid aliases need INTEGER


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are UTC and aware on the way out, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        from datetime import UTC

        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}  # noqa: RUF012


class RawMail(Base):
    """Bytes exactly as received, stored before the 250; the pipeline's work queue."""

    __tablename__ = "raw_mail"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(16))  # smtp | pipe | imap:<account>
    mail_from: Mapped[str] = mapped_column(String(512))
    rcpt_tos: Mapped[list[str]]
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    message_id: Mapped[str] = mapped_column(String(512), default="")
    in_reply_to: Mapped[str] = mapped_column(Text, default="")
    references: Mapped[str] = mapped_column(Text, default="")
    # received -> processed | duplicate | quarantined
    state: Mapped[str] = mapped_column(String(16), default="received")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(Text, default="")  # why it is in its state
    processed_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_raw_mail_state", "state", "id"),
        Index("ix_raw_mail_source_sha", "source", "sha256"),
    )


class Ticket(Base):
    __tablename__ = "ticket"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    ref: Mapped[str] = mapped_column(String(32), unique=True)
    queue: Mapped[str] = mapped_column(String(64))
    mailbox: Mapped[str] = mapped_column(String(320))  # the address the customer wrote to
    status: Mapped[str] = mapped_column(String(16), default="new")
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    subject: Mapped[str] = mapped_column(Text, default="")
    requester: Mapped[str] = mapped_column(String(320))
    requester_name: Mapped[str] = mapped_column(String(200), default="")
    reply_to: Mapped[str] = mapped_column(String(320), default="")
    submitter: Mapped[str] = mapped_column(String(320), default="")
    assignee: Mapped[str] = mapped_column(String(320), default="")
    category: Mapped[str] = mapped_column(String(64), default="")
    follow_up_of: Mapped[int | None] = mapped_column(ForeignKey("ticket.id"))
    thread_root: Mapped[str] = mapped_column(String(512), default="")  # first Message-ID
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    first_response_at: Mapped[datetime | None]
    solved_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    last_customer_at: Mapped[datetime | None]
    last_agent_at: Mapped[datetime | None]
    nudge_due_at: Mapped[datetime | None]
    autoclose_due_at: Mapped[datetime | None]
    close_due_at: Mapped[datetime | None]
    escalate_due_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_ticket_status", "status", "queue"),
        Index("ix_ticket_nudge", "nudge_due_at"),
        Index("ix_ticket_autoclose", "autoclose_due_at"),
        Index("ix_ticket_close", "close_due_at"),
        Index("ix_ticket_escalate", "escalate_due_at"),
        Index("ix_ticket_requester", "requester"),
    )


class Message(Base):
    """One mail on a ticket, inbound or outbound, with why it landed there."""

    __tablename__ = "message"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("ticket.id"))
    raw_id: Mapped[int | None] = mapped_column(ForeignKey("raw_mail.id"))
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    kind: Mapped[str] = mapped_column(String(8))  # public | note | auto
    classification: Mapped[str] = mapped_column(String(32), default="")
    message_id: Mapped[str] = mapped_column(String(512))
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    from_addr: Mapped[str] = mapped_column(String(320), default="")
    from_name: Mapped[str] = mapped_column(String(200), default="")
    to_addrs: Mapped[list[str]] = mapped_column(default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(default=list)
    mailboxes: Mapped[list[str]] = mapped_column(default=list)  # our addresses it came in on
    subject: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    new_text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str] = mapped_column(Text, default="")  # sanitised
    threaded_by: Mapped[str] = mapped_column(String(600))
    author: Mapped[str] = mapped_column(String(320), default="")  # agent, for agent mail
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    sent_at: Mapped[datetime | None]  # the Date header
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_message_message_id", "message_id"),
        Index("ix_message_ticket", "ticket_id", "id"),
    )


class ThreadRef(Base):
    """Every Message-ID we stored or saw referenced, and the ticket it belongs to."""

    __tablename__ = "thread_ref"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(512))
    ticket_id: Mapped[int] = mapped_column(ForeignKey("ticket.id"))
    stored: Mapped[bool] = mapped_column(Boolean, default=False)  # False: only referenced

    __table_args__ = (
        UniqueConstraint("message_id", "ticket_id"),
        Index("ix_thread_ref_mid", "message_id"),
    )


class Participant(Base):
    __tablename__ = "participant"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("ticket.id"))
    address: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))  # requester | cc | submitter | agent

    __table_args__ = (
        UniqueConstraint("ticket_id", "address"),
        Index("ix_participant_address", "address"),
    )


class AttachmentRow(Base):
    """Attachment metadata; the bytes live content-addressed under data_dir/attachments."""

    __tablename__ = "attachment"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("message.id"))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    content_id: Mapped[str] = mapped_column(String(512), default="")
    inline: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_attachment_message", "message_id"),)


class Event(Base):
    """The audit log: who changed what on a ticket, when, and from which message."""

    __tablename__ = "event"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("ticket.id"))
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(32))
    old: Mapped[str] = mapped_column(Text, default="")
    new: Mapped[str] = mapped_column(Text, default="")
    message_row: Mapped[int | None] = mapped_column(ForeignKey("message.id"))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index("ix_event_ticket", "ticket_id", "id"),)


class Delivery(Base):
    """One outbound mail to one recipient: the outbox row and its delivery state."""

    __tablename__ = "delivery"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("ticket.id"))
    message_row: Mapped[int | None] = mapped_column(ForeignKey("message.id"))
    kind: Mapped[str] = mapped_column(String(32))  # acknowledgement, nudge, reply, ...
    automatic: Mapped[bool] = mapped_column(Boolean, default=True)
    message_id: Mapped[str] = mapped_column(String(512))
    mail_from: Mapped[str] = mapped_column(String(512))  # VERP bounce address
    recipient: Mapped[str] = mapped_column(String(320))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # queued | sent | deferred | failed | bounced | suppressed
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    next_attempt_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_delivery_due", "status", "next_attempt_at"),
        Index("ix_delivery_recipient", "recipient", "created_at"),
        Index("ix_delivery_ticket", "ticket_id"),
        Index("ix_delivery_message_id", "message_id"),
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempt"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("delivery.id"))
    at: Mapped[datetime]
    outcome: Mapped[str] = mapped_column(String(16))  # sent | temporary | permanent | bounce
    code: Mapped[int] = mapped_column(Integer, default=0)
    reply: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_attempt_delivery", "delivery_id"),)


class Suppression(Base):
    __tablename__ = "suppression"
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("delivery.id"))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class RefusedForward(Base):
    """A staff forward refused for missing context, kept until a reply completes it."""

    __tablename__ = "refused_forward"
    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    raw_id: Mapped[int] = mapped_column(ForeignKey("raw_mail.id"))
    message_id: Mapped[str] = mapped_column(String(512))
    refusal_message_id: Mapped[str] = mapped_column(String(512), default="")
    from_addr: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text, default="")
    mailbox: Mapped[str] = mapped_column(String(320))
    own_text: Mapped[str] = mapped_column(Text, default="")
    missing: Mapped[list[str]]
    present: Mapped[list[str]]
    state: Mapped[str] = mapped_column(String(16), default="refused")  # refused | completed
    ticket_id: Mapped[int | None] = mapped_column(ForeignKey("ticket.id"))
    created_at: Mapped[datetime]

    __table_args__ = (Index("ix_refused_forward_refusal", "refusal_message_id"),)


class ImapCursor(Base):
    __tablename__ = "imap_cursor"
    account: Mapped[str] = mapped_column(String(128), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger, default=0)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    last_poll_at: Mapped[datetime | None]
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_error_at: Mapped[datetime | None]


class IntakeMark(Base):
    """How far mail of one intake file has been moved to raw_mail (gateway/intake.py)."""

    __tablename__ = "intake_mark"
    epoch: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
