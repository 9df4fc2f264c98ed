"""`#command` lines at the top of an agent's reply."""

from __future__ import annotations

import pytest

from parsing.commands import Command, CommandBlock, parse_commands

C = Command

CASES: list[tuple[str, str, tuple[Command, ...], str]] = [
    ("none", "Hello,\n\nthanks.", (), "Hello,\n\nthanks."),
    ("empty", "", (), ""),
    ("one", "#status pending\nHello", (C("status", "pending", 1),), "Hello"),
    ("no-args", "#note\nInternal only", (C("note", "", 1),), "Internal only"),
    (
        "several-with-blank-lines",
        "#status solved\n\n#priority high\n#assign sam\n\nThanks, done.",
        (C("status", "solved", 1), C("priority", "high", 3), C("assign", "sam", 4)),
        "Thanks, done.",
    ),
    (
        "leading-blank-lines",
        "\n\n#queue trial\nMoved.",
        (C("queue", "trial", 3),),
        "Moved.",
    ),
    ("name-lower-cased", "#Status Pending\nx", (C("status", "Pending", 1),), "x"),
    ("colon-after-name", "#status: pending\nx", (C("status", "pending", 1),), "x"),
    ("colon-no-space", "#status:pending\nx", (C("status", "pending", 1),), "x"),
    (
        "args-stripped",
        "#assign    sam@example.com   \nx",
        (C("assign", "sam@example.com", 1),),
        "x",
    ),
    ("leading-space", "  #status open\nx", (C("status", "open", 1),), "x"),
    ("leading-nbsp", "\u00a0#status open\nx", (C("status", "open", 1),), "x"),
    ("nbsp-before-args", "#status\u00a0open\nx", (C("status", "open", 1),), "x"),
    ("tab-before-args", "#status\topen\nx", (C("status", "open", 1),), "x"),
    (
        "dash-underscore-names",
        "#cc-add jo\n#time_spent 5m\nx",
        (C("cc-add", "jo", 1), C("time_spent", "5m", 2)),
        "x",
    ),
    ("crlf", "#status open\r\n\r\nBody\r\nmore", (C("status", "open", 1),), "Body\nmore"),
    ("only-commands", "#status solved\n#note", (C("status", "solved", 1), C("note", "", 2)), ""),
    (
        "number-is-not-a-command",
        "#123 is the order\n#status open",
        (),
        "#123 is the order\n#status open",
    ),
    ("heading-is-not-a-command", "# Heading\ntext", (), "# Heading\ntext"),
    ("hash-alone", "#\ntext", (), "#\ntext"),
    ("punctuation-after-name", "#foo,bar\ntext", (), "#foo,bar\ntext"),
    ("hashtag-later-in-body", "Hello\n#status solved", (), "Hello\n#status solved"),
    (
        "block-ends-at-first-text-line",
        "#status open\nPlease see #assign below\n#priority low",
        (C("status", "open", 1),),
        "Please see #assign below\n#priority low",
    ),
    (
        "body-keeps-inner-blank-lines",
        "#note\n\n\nLine one\n\n\nLine two",
        (C("note", "", 1),),
        "Line one\n\n\nLine two",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "commands", "body"), CASES, ids=[case[0] for case in CASES]
)
def test_parse_commands(name: str, text: str, commands: tuple[Command, ...], body: str) -> None:
    assert parse_commands(text) == CommandBlock(commands=commands, body=body)


def test_values_are_frozen() -> None:
    block = parse_commands("#status open\nx")
    with pytest.raises(AttributeError):
        block.commands[0].name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        block.body = "changed"  # type: ignore[misc]
