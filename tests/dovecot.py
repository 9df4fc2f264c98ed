"""A throwaway Dovecot IMAP server on loopback for the IMAP intake tests.

Plain IMAP (with STARTTLS) and IMAPS on free ports, one passwd-file user, Maildir storage and
logs in a temporary folder. `restart()` brings it back on the same ports and data, so a test
can kill the server in the middle of a poll.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services import free_port, unavailable, wait_port

DOVECOT = "/usr/sbin/dovecot"
USER = "support@example.com"
PASSWORD = 'imap-test-"pass\\word'  # a quote and a backslash: LOGIN must quote them

_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
instance_name = sg-dovecot-{port}
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
disable_plaintext_auth = no
auth_mechanisms = plain login
ssl = yes
ssl_cert = <{base}/cert.pem
ssl_key = <{base}/key.pem
mail_location = maildir:{base}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
protocol imap {{
  imap_idle_notify_interval = 2 mins
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
{extra}
"""


@dataclass
class Dovecot:
    """One running server; its ports and data survive `stop()` / `start()`."""

    base: Path
    port: int
    tls_port: int
    user: str = USER
    password: str = PASSWORD
    settings: dict[str, object] = field(default_factory=dict, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def write_config(self, extra: str = "") -> None:
        text = _CONF.format(**self.settings, extra=extra)
        (self.base / "dovecot.conf").write_text(text)

    def reconfigure(self, extra: str) -> None:
        """Restart with extra settings, e.g. `imap_capability = IMAP4rev1` to hide MOVE."""
        self.stop()
        self.write_config(extra)
        self.start()

    @property
    def cert(self) -> Path:
        return self.base / "cert.pem"

    @property
    def maildir(self) -> Path:
        return self.base / "mail" / self.user

    def start(self) -> None:
        with open(self.base / "stderr.log", "ab") as errors:
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.base / "dovecot.conf")],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        try:
            wait_port(self.port, timeout=15)
            wait_port(self.tls_port, timeout=15)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"Dovecot did not start:\n{self.log()}") from None

    def stop(self) -> None:
        """Kill the whole process group at once, as a crash would: no goodbye to clients."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.process = None
        # The listeners are gone once the group is dead; wait for the port to be free again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(self.port):
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        parts = []
        for name in ("dovecot.log", "stderr.log"):
            path = self.base / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # -- a plain stdlib client for the test's own view of the mailbox ----------------------
    def client(self) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        conn.login(self.user, self.password)
        return conn

    def append(self, data: bytes, folder: str = "INBOX") -> None:
        conn = self.client()
        try:
            _ok(conn.append(folder, "", None, data))
        finally:
            conn.logout()

    def create(self, folder: str) -> None:
        conn = self.client()
        try:
            _ok(conn.create(folder))
        finally:
            conn.logout()

    def flags(self, folder: str = "INBOX") -> dict[int, set[str]]:
        """UID -> flags of every message in the folder."""
        conn = self.client()
        try:
            _ok(conn.select(folder, readonly=True))
            typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS)")
            _ok((typ, data))
        finally:
            conn.logout()
        result: dict[int, set[str]] = {}
        for item in data:
            if not isinstance(item, bytes):
                continue
            parsed = imaplib.ParseFlags(item)
            uid = item.split(b"UID ", 1)[1].split(b" ", 1)[0].rstrip(b")")
            result[int(uid)] = {f.decode() for f in parsed}
        return result

    def bodies(self, folder: str = "INBOX") -> list[bytes]:
        conn = self.client()
        try:
            _ok(conn.select(folder, readonly=True))
            typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
            _ok((typ, data))
        finally:
            conn.logout()
        return [item[1] for item in data if isinstance(item, tuple)]


def _ok(result: tuple[str, object]) -> None:
    if result[0] != "OK":
        raise AssertionError(f"IMAP said {result!r}")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _accounts() -> tuple[str, str, int, int]:
    """The login and internal users, and the uid/gid mail is stored as."""
    if os.geteuid() == 0:
        for name in ("dovecot", "dovenull", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                unavailable("Dovecot", f"the {name} user is missing: apt-get install dovecot-imapd")
        nobody = pwd.getpwnam("nobody")
        return "dovenull", "dovecot", nobody.pw_uid, nobody.pw_gid
    me = pwd.getpwuid(os.geteuid())
    return me.pw_name, me.pw_name, me.pw_uid, me.pw_gid


@pytest.fixture(name="dovecot")
def dovecot_fixture() -> Iterator[Dovecot]:
    if not os.path.exists(DOVECOT) or shutil.which("openssl") is None:
        unavailable("Dovecot", "apt-get install dovecot-imapd (as .ci/run does)")
    login_user, internal_user, uid, gid = _accounts()
    # Not under pytest's tmp_path: the mail user must be able to reach the folder.
    base = Path(tempfile.mkdtemp(prefix="sg-dovecot-"))
    base.chmod(0o755)
    port, tls_port = free_port(), free_port()
    for sub in ("run", "state", "mail", "home"):
        (base / sub).mkdir()
    for sub in ("mail", "home"):
        os.chown(base / sub, uid, gid)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(base / "key.pem"),
            "-out",
            str(base / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    (base / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    settings = {
        "base": base,
        "port": port,
        "tls_port": tls_port,
        "login_user": login_user,
        "internal_user": internal_user,
        "uid": uid,
        "gid": gid,
    }
    server = Dovecot(base=base, port=port, tls_port=tls_port, settings=settings)
    server.write_config()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
