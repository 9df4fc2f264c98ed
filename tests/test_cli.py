"""The CLI as people and scripts use it: real processes, real config, JSON in DESIGN.md's shapes."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET, mail, write_config
from services import free_port, wait_port

CORPUS = Path(__file__).parent / "corpus"


class Cli:
    def __init__(self, folder: Path, *, smtp_port: int) -> None:
        self.folder = folder
        self.smtp_port = smtp_port
        self.config = write_config(folder, smtp_port=smtp_port)
        self.env = {
            **os.environ,
            "SUPPORTGATE_SECRET": SECRET,
            "SUPPORTGATE_CONFIG": str(self.config),
        }

    def run(
        self, *args: str, stdin: bytes = b"", check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args],
            input=stdin,
            capture_output=True,
            env=self.env,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stderr.decode()}")
        assert b"Traceback" not in result.stderr, result.stderr.decode()
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def serve(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_port(self.smtp_port)
        return process


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    tool = Cli(tmp_path, smtp_port=free_port())
    tool.run("db", "upgrade")
    yield tool


def test_ingest_process_and_the_ticket_json(cli: Cli) -> None:
    data = mail(
        subject="Emails not delivered",
        message_id="first@customer.org",
        headers={"Cc": "bob@customer.org"},
    )
    result = cli.run(
        "ingest", "--recipient", "support@example.com", stdin=data.replace(b"\r\n", b"\n")
    )
    assert result.returncode == 0
    assert cli.run("process").returncode == 0
    (ticket,) = cli.json("tickets", "list")
    assert set(ticket) >= {
        "ref",
        "queue",
        "status",
        "priority",
        "requester",
        "cc",
        "assignee",
        "subject",
        "created_at",
    }
    shown = cli.json("tickets", "show", ticket["ref"])
    assert shown["ref"] == ticket["ref"] == "SG-1"
    assert (
        shown["queue"] == "support" and shown["status"] == "new" and shown["priority"] == "urgent"
    )
    assert shown["cc"] == ["bob@customer.org"] and shown["assignee"] is None
    assert shown["created_at"].endswith("Z")
    first = shown["messages"][0]
    assert {k: first[k] for k in ("message_id", "direction", "kind", "from", "threaded_by")} == {
        "message_id": "first@customer.org",
        "direction": "in",
        "kind": "public",
        "from": "jane@customer.org",
        "threaded_by": "new",
    }
    assert {m["direction"] for m in shown["messages"]} == {"in", "out"}
    cli.run(
        "tickets",
        "update",
        "SG-1",
        "--status",
        "pending",
        "--priority",
        "high",
        "--assign",
        "Sam",
        "--queue",
        "trial",
    )
    shown = cli.json("tickets", "show", "SG-1")
    assert (shown["status"], shown["priority"], shown["assignee"], shown["queue"]) == (
        "pending",
        "high",
        "sam@example.com",
        "trial",
    )
    assert cli.json("tickets", "list", "--status", "open") == []
    bad = cli.run("tickets", "update", "SG-1", "--status", "sleeping", check=False)
    assert bad.returncode == 1 and b"unknown status 'sleeping'" in bad.stderr


def test_ingest_exit_codes(cli: Cli) -> None:
    assert (
        cli.run(
            "ingest", "--recipient", "nobody@elsewhere.org", stdin=mail(), check=False
        ).returncode
        == 65
    )
    assert cli.run("ingest", stdin=b"From: a@b\r\n\r\nnul \x00\r\n", check=False).returncode == 65
    os.chmod(cli.folder / "var", 0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway; break the database instead
            assert cli.run("ingest", stdin=mail(), check=False).returncode == 75
    finally:
        os.chmod(cli.folder / "var", 0o700)
    broken = dict(cli.env)
    broken["SUPPORTGATE_SECRET"] = ""
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "ingest"],
        input=mail(),
        capture_output=True,
        env=broken,
        timeout=60,
    )
    assert result.returncode == 75 and b"SUPPORTGATE_SECRET" in result.stderr


def test_inspect_explains_without_storing(cli: Cli) -> None:
    subject = "=?utf-8?q?R=C3=A9ponse_automatique?= : Re: Hello"
    data = mail(
        subject=subject,
        body=(
            "Thanks!\r\n\r\n"
            "On Mon, 2 Mar 2026 at 09:00, Jane Doe <jane@customer.org> wrote:\r\n"
            "> old text\r\n"
        ),
        headers={"Auto-Submitted": "auto-replied"},
    )
    report = json.loads(cli.run("inspect", "--json", stdin=data).stdout)
    assert report["classification"] == "auto-reply"
    assert report["reason"].startswith("auto-submitted")
    assert report["subject"] == "Réponse automatique : Re: Hello"
    assert report["new_text"] == "Thanks!"
    assert report["thread"]["threaded_by"] == "new"
    bounce = (CORPUS / "flanker" / "bounce" / "mailbox-full.eml").read_bytes()
    report = json.loads(cli.run("inspect", "--json", stdin=bounce).stdout)
    assert report["classification"] == "bounce"
    recipients = report["bounce"]["recipients"]
    assert recipients and set(recipients[0]) >= {"address", "status", "hard"}
    assert cli.json("tickets", "list") == []


def test_quarantine_and_status(cli: Cli) -> None:
    depth = 60
    bomb = b"From: a@customer.org\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(
        f"--b{n}\r\nContent-Type: multipart/mixed; boundary=b{n + 1}\r\n\r\n".encode()
        for n in range(depth)
    )
    cli.run("ingest", stdin=bomb)
    cli.run("process")
    (row,) = cli.json("quarantine", "list")
    assert "nesting" in row["reason"]
    status = cli.run("status", "--json", check=False)
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert report["quarantined"] == 1 and report["backlog"] == 0
    assert {"backlog", "quarantined", "outbox_queued", "deliveries_failed_24h"} <= set(report)
    assert cli.run("quarantine", "reprocess", str(row["id"])).returncode == 0
    assert cli.run("quarantine", "reprocess", "999", check=False).returncode == 1


def test_outbox_flush_writes_the_maildir_and_deliveries_lists_it(cli: Cli) -> None:
    cli.run("ingest", stdin=mail())
    cli.run("process")
    cli.run("outbox", "flush")
    rows = cli.json("deliveries")
    assert {r["status"] for r in rows} == {"sent"}
    assert set(rows[0]) >= {
        "id",
        "message_id",
        "ticket",
        "kind",
        "recipient",
        "status",
        "attempts",
        "last_error",
        "created_at",
        "sent_at",
    }
    assert len(list((cli.folder / "var" / "outbox-maildir" / "new").iterdir())) == len(rows)
    assert cli.json("deliveries", "--failed") == []


def test_templates_commands(cli: Cli) -> None:
    names = cli.run("templates", "list").stdout.decode().split()
    assert "acknowledgement" in names and "nudge" in names
    assert cli.run("templates", "check").returncode == 0
    preview = cli.run("templates", "preview", "nudge").stdout.decode()
    assert "Subject:" in preview and "Just checking in" in preview


def test_timers_run_then_outbox_flush_sends_what_is_due(cli: Cli) -> None:
    cli.run("ingest", stdin=mail())
    cli.run("process")
    cli.run("tickets", "update", "SG-1", "--status", "pending")
    cli.run("timers", "run", "--now", "2099-01-01T00:00:00Z")
    cli.run("outbox", "flush")
    kinds = {r["kind"]: r["status"] for r in cli.json("deliveries")}
    assert kinds["nudge"] == "sent"


def test_serve_accepts_mail_and_a_restart_processes_the_backlog(cli: Cli) -> None:
    process = cli.serve()
    try:
        with smtplib.SMTP("127.0.0.1", cli.smtp_port, timeout=10) as client:
            client.sendmail("jane@customer.org", ["support@example.com"], mail())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    # mail stored but not processed, as after a crash right after the 250
    cli.run("ingest", stdin=mail(message_id="late@customer.org"))
    process = cli.serve()
    try:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(cli.json("tickets", "list")) == 2:
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert len(cli.json("tickets", "list")) == 2


def test_a_worker_whose_serve_is_gone_stops(cli: Cli) -> None:
    """The wake pipe's end-of-file means the front died: the worker must stop, not spin."""
    read_fd, write_fd = os.pipe()
    worker = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker", "--wake-fd", str(read_fd)],
        env=cli.env,
        pass_fds=(read_fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(read_fd)
    os.write(write_fd, b"!")
    os.close(write_fd)
    assert worker.wait(timeout=60) == 0
    assert b"serve process is gone" in worker.stderr.read()  # type: ignore[union-attr]
