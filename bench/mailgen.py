"""Deterministic, realistic support mail for the benchmarks.

New customer mail, replies that thread by In-Reply-To/References to earlier mail, HTML
multipart, small attachments; 2–20 KB, CRLF line endings, seeded so every run sends the same.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass

DOMAIN = "example.com"
MAILBOXES = (("support@example.com", 60), ("trialsupport@example.com", 25), ("hey@example.com", 15))

_WORDS = (
    "account login password reset invoice billing export report dashboard error page "
    "timeout server email delivery bounce domain settings team member invite token api "
    "webhook integration plan upgrade trial customer order refund shipping address update "
    "mobile app browser chrome firefox safari screenshot attached issue problem since "
    "yesterday morning today urgent please help thanks again cannot seems broken working "
    "again after change we our my the a an is was are were have has not with for from to in "
    "on at by this that it when what why how could would should will can".split()
)
_SUBJECTS = (
    "Cannot log in to my account",
    "Invoice for last month is wrong",
    "Export to CSV fails with an error",
    "Question about upgrading our plan",
    "Password reset mail never arrives",
    "Webhook stopped firing",
    "Dashboard is very slow today",
    "How do I invite a team member?",
    "Refund request for order",
    "API returns 500 since this morning",
    "Problème de connexion",
    "Mobile app crashes on start",
)
_NAMES = ("Jane Doe", "Max Müller", "Ana García", "Li Wei", "Olu Ade", "Sam Smith", "Zoë Martin")


@dataclass(frozen=True, slots=True)
class Mail:
    mail_from: str
    rcpt: str
    data: bytes  # CRLF, not dot-stuffed
    message_id: str
    kind: str  # new | reply | html | attachment


def _sentences(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(6, 18))
        out.append(" ".join(words).capitalize() + ".")
    return out


class _Text:
    """A pool of sentences, cheap to assemble into paragraphs of a wanted size."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pool = _sentences(rng, 3000)

    def body(self, size: int) -> str:
        lines: list[str] = []
        total = 0
        while total < size:
            para = " ".join(self.rng.choices(self.pool, k=self.rng.randint(2, 6)))
            for line in _wrap(para):
                lines.append(line)
                total += len(line) + 2
            lines.append("")
        return "\r\n".join(lines)


def _wrap(text: str, width: int = 72) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out


def _cut(text: str, size: int) -> str:
    """At most `size` characters of `text`, cut at a line end so no bare CR is left."""
    end = text.rfind("\r\n", 0, max(size, 0))
    return text[:end] if end > 0 else text.split("\r\n", 1)[0]


def _headers(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs)


def generate(count: int, *, seed: int = 1, reply_share: float = 0.3) -> list[Mail]:
    """`count` messages in sending order; a reply always answers a message sent earlier."""
    rng = random.Random(seed)
    text = _Text(rng)
    boxes = [b for b, _ in MAILBOXES]
    weights = [w for _, w in MAILBOXES]
    mails: list[Mail] = []
    originals: list[tuple[str, str, str, str, str]] = []  # from, rcpt, subject, mid, refs
    customers = max(count // 2, 1)
    for i in range(count):
        is_reply = originals and i > 50 and rng.random() < reply_share
        date = f"Mon, 02 Mar 2026 {9 + i // 3600 % 10:02d}:{i // 60 % 60:02d}:{i % 60:02d} +0000"
        mid = f"{seed}.{i}.{rng.getrandbits(48):x}@mail.customer{i % 97}.org"
        size = int(rng.triangular(1500, 19000, 4000))
        if is_reply:
            # Answer something sent at least 50 messages ago, so it is usually stored first.
            sender, rcpt, subject, parent, refs = originals[rng.randrange(0, len(originals) - 50)]
            subject = subject if subject.startswith("Re: ") else f"Re: {subject}"
            references = f"{refs} <{parent}>".strip()
            quoted = "\r\n".join("> " + line for line in text.body(size // 3).split("\r\n"))
            body = text.body(size - size // 3) + "\r\n\r\nOn Mon, you wrote:\r\n" + quoted
            head = [("In-Reply-To", f"<{parent}>"), ("References", references)]
            kind = "reply"
        else:
            c = rng.randrange(customers)
            name = _NAMES[c % len(_NAMES)]
            sender = f"{name} <customer{c}@customer{c % 97}.org>"
            rcpt = rng.choices(boxes, weights)[0]
            subject = f"{rng.choice(_SUBJECTS)} #{i}"
            references = ""
            body = text.body(size)
            head = []
            kind = "new"
        addr = sender[sender.index("<") + 1 : -1]
        common = [
            ("From", sender),
            ("To", rcpt),
            ("Subject", subject),
            ("Date", date),
            ("Message-ID", f"<{mid}>"),
            *head,
            ("MIME-Version", "1.0"),
        ]
        roll = rng.random()
        if roll < 0.25:
            kind = "html" if kind == "new" else kind
            boundary = f"alt-{i}-{rng.getrandbits(32):x}"
            html = (
                "<html><body>"
                + "".join(f"<p>{p}</p>" for p in body.split("\r\n\r\n"))
                + "</body></html>"
            )
            html = "\r\n".join(_wrap(html, 76))
            data = (
                _headers(
                    [*common, ("Content-Type", f'multipart/alternative; boundary="{boundary}"')]
                )
                + f"\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                + "Content-Transfer-Encoding: 8bit\r\n\r\n"
                + _cut(body, len(body) // 2)
                + f"\r\n--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n"
                + "Content-Transfer-Encoding: 8bit\r\n\r\n"
                + _cut(html, len(html) // 2)
                + f"\r\n--{boundary}--\r\n"
            )
        elif roll < 0.37:
            kind = "attachment" if kind == "new" else kind
            boundary = f"mix-{i}-{rng.getrandbits(32):x}"
            blob = rng.randbytes(rng.randint(800, max(size // 2, 900)))
            encoded = base64.encodebytes(blob).decode().replace("\n", "\r\n")
            data = (
                _headers([*common, ("Content-Type", f'multipart/mixed; boundary="{boundary}"')])
                + f"\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                + "Content-Transfer-Encoding: 8bit\r\n\r\n"
                + _cut(body, max(len(body) - len(encoded), 400))
                + f'\r\n--{boundary}\r\nContent-Type: image/png; name="screenshot-{i}.png"\r\n'
                + f'Content-Disposition: attachment; filename="screenshot-{i}.png"\r\n'
                + "Content-Transfer-Encoding: base64\r\n\r\n"
                + encoded
                + f"--{boundary}--\r\n"
            )
        else:
            data = (
                _headers(
                    [
                        *common,
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Transfer-Encoding", "8bit"),
                    ]
                )
                + "\r\n"
                + body
                + "\r\n"
            )
        mails.append(Mail(addr, rcpt, data.encode("utf-8"), mid, kind))
        originals.append((sender, rcpt, subject, mid, references))
    return mails


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload as sent on the wire, terminator included."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


if __name__ == "__main__":
    import collections
    import statistics

    sample = generate(2000)
    sizes = [len(m.data) for m in sample]
    print(collections.Counter(m.kind for m in sample))
    low, mid, high = min(sizes) / 1024, statistics.median(sizes) / 1024, max(sizes) / 1024
    print(f"size KB: min {low:.1f} median {mid:.1f} max {high:.1f}")
