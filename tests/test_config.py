"""The config file: the example runs as it is; every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load

from conftest import EXAMPLE, SECRET

ENV = {"SUPPORTGATE_SECRET": SECRET}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "supportgate.toml"
    path.write_text(text)
    return path


def test_the_example_config_loads_as_it_is(tmp_path: Path) -> None:
    config = load(write(tmp_path, EXAMPLE.read_text()), env=ENV)
    assert [m.queue for m in config.mailbox] == ["support", "trial", "hey"]
    assert config.smtp.listen == ["127.0.0.1:2525"]
    assert config.outbound.smarthost == ""
    assert config.data_dir == (tmp_path / "var").resolve()
    assert (
        config.database_url
        == f"sqlite+aiosqlite:///{(tmp_path / 'var' / 'supportgate.db').resolve()}"
    )
    assert config.mailbox_for("support+tok3n@example.com") is config.mailbox[0]
    assert config.is_ours("bounces+12-abc@example.com")
    assert not config.is_ours("sam@example.com")  # agents are people, not ours
    assert config.is_staff("sam@example.com") and config.is_staff("anyone@example.com")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("max_message_bytes = 26214400", "max_mesage_bytes = 26214400"),
            r"\[smtp.max_mesage_bytes\] unknown key; did you mean",
        ),
        (
            ('address = "support@example.com"', 'address = "support at example.com"'),
            r"\[mailbox\[0\].address\] 'support at example.com' is not an email address",
        ),
        (
            ('listen = ["127.0.0.1:2525"]', 'listen = "127.0.0.1:2525"'),
            r"\[smtp.listen\] must be a list of a string",
        ),
        (
            ('listen = ["127.0.0.1:2525"]', 'listen = ["localhost"]'),
            r"\[smtp.listen\] 'localhost' is not host:port",
        ),
        (
            ("max_recipients = 50", "max_recipients = -1"),
            r"\[smtp.max_recipients\] -1 must be greater than 0",
        ),
        (
            ('queue = "trial"', 'queue = "trails"'),
            r"\[mailbox\[1\].queue\] 'trails' is not a \[\[queue\]\] name",
        ),
        (
            ('verify = ["token", "dkim"]', 'verify = ["token", "pgp"]'),
            r"\[agents.verify\] 'pgp' is not one of",
        ),
        (("require_tls = false", "require_tls = 1"), r"\[smtp.require_tls\] must be true or false"),
        (
            ('domain = "example.com"', 'domain = "example"'),
            r"\[gateway.domain\] 'example' is not a domain name",
        ),
    ],
)
def test_a_mistake_names_the_key_file_and_line(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    text = EXAMPLE.read_text()
    assert change[0] in text
    path = write(tmp_path, text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError, match=expected) as info:
        load(path, env=ENV)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path.resolve()}:")
    line = int(message.split(":")[1])
    assert change[1].split("=")[0].strip() in path.read_text().splitlines()[line - 1]


def test_a_missing_or_short_secret_is_an_error_never_a_default(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE.read_text())
    with pytest.raises(ConfigError, match="SUPPORTGATE_SECRET is not set"):
        load(path, env={})
    with pytest.raises(ConfigError, match="too short"):
        load(path, env={"SUPPORTGATE_SECRET": "short"})


def test_broken_toml_and_a_missing_file_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[gateway\ndomain = 1"), env=ENV)
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "nope.toml", env=ENV)
    with pytest.raises(ConfigError, match=r"\[gateway\] section is required"):
        load(write(tmp_path, "[smtp]\n"), env=ENV)


def test_the_cli_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path, EXAMPLE.read_text().replace("max_recipients", "max_recipient"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(path), "tickets", "list"],
        capture_output=True,
        text=True,
        env={"SUPPORTGATE_SECRET": SECRET, "PATH": "/usr/bin"},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "smtp.max_recipient" in result.stderr and "Traceback" not in result.stderr
