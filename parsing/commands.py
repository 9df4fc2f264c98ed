"""`#word args` command lines at the top of an agent's new text (syntax only)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Command", "CommandBlock", "parse_commands"]

# '#', a word that starts with a letter, then the end of the line, whitespace or a colon:
# "#status pending", "#status: pending", "#note". Not "#123", "# heading" or "#foo,bar".
_COMMAND = re.compile(r"\s*#(?P<name>[A-Za-z][A-Za-z_-]*)(?::|(?=\s)|$)(?P<args>.*)")


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: the name lower-cased without '#', its arguments, its 1-based line."""

    name: str
    args: str
    line: int


@dataclass(frozen=True, slots=True)
class CommandBlock:
    """The commands at the top of a message and the text that follows them."""

    commands: tuple[Command, ...]
    body: str


def parse_commands(new_text: str) -> CommandBlock:
    """The leading block of command lines (blank lines between them allowed) and the body.

    The block ends at the first line that is neither blank nor a command, so a '#word' further
    down is ordinary text. Which names are real commands is decided by the caller.
    """
    lines = new_text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    commands: list[Command] = []
    start = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        match = _COMMAND.fullmatch(line)
        if match is None:
            start = index
            break
        commands.append(
            Command(name=match["name"].lower(), args=match["args"].strip(), line=index + 1)
        )
    else:
        start = len(lines)
    while start < len(lines) and not lines[start].strip():
        start += 1
    return CommandBlock(commands=tuple(commands), body="\n".join(lines[start:]))
