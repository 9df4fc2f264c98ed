"""Parsing cost per message: `parse_message` against the stdlib parse it starts from.

    .venv/bin/python bench/parse.py [--messages 2000] [--rounds 5]

Generated bench mail (`mailgen`), parsed in this process, alternating rounds: the baseline
is `email.message_from_bytes(data, policy=policy.default)` with every text part's content
read (what the issue calls ~2 ms a message); ours adds classification, the new text of
replies, HTML to text, attachments and bounce detection. CPU time (process_time), medians.
"""

from __future__ import annotations

import argparse
import email
import statistics
import sys
import time
from email import policy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mailgen

from parsing.mime import Limits, parse_message


def stdlib(data: bytes) -> None:
    msg = email.message_from_bytes(data, policy=policy.default)
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            part.get_content()  # type: ignore[attr-defined]


LIMITS = Limits()


def ours(data: bytes) -> None:
    parse_message(data, limits=LIMITS)


def per_message(function: object, datas: list[bytes]) -> float:
    started = time.process_time()
    for data in datas:
        function(data)  # type: ignore[operator]
    return (time.process_time() - started) / len(datas)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    datas = [m.data for m in mailgen.generate(args.messages, seed=1)]
    size = sum(map(len, datas)) / len(datas)
    for data in datas[:50]:  # warm: regex caches, imports
        stdlib(data)
        ours(data)
    base, mine = [], []
    for _ in range(args.rounds):
        base.append(per_message(stdlib, datas))
        mine.append(per_message(ours, datas))
    b, m = statistics.median(base), statistics.median(mine)
    print(f"{len(datas)} messages, {size / 1024:.1f} KB on average, {args.rounds} rounds")
    print(f"stdlib parse (policy.default)  {b * 1e3:6.3f} ms a message")
    print(f"parse_message                  {m * 1e3:6.3f} ms a message = {m / b:.2f}× the stdlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
