"""The one TOML config file, loaded into frozen typed objects; every mistake names its key."""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

DEFAULT_CONFIG = "supportgate.toml"
_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
)
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A config mistake, worded for the person who edits the file."""


def _address(value: str) -> str:
    if not _ADDRESS.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not an email address (like name@example.com)")
    return value.lower()


def _domain(value: str) -> str:
    if not _DOMAIN.match(value) or "." not in value:
        raise ValueError(f"{value!r} is not a domain name (like example.com)")
    return value.lower()


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (like 127.0.0.1:2525)")
    return value


def _positive(value: int | float) -> int | float:
    if value <= 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return value


def _prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Z]{1,10}", value):
        raise ValueError(f"{value!r} must be 1 to 10 capital letters (like SG)")
    return value


def _regexes(values: list[str]) -> list[str]:
    for value in values:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return values


def _optional(check: Callable[[str], str]) -> Callable[[str], str]:
    def run(value: str) -> str:
        return check(value) if value else value

    return run


def _one_of(*allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _each(check: Callable[[str], str]) -> Callable[[list[str]], list[str]]:
    def run(values: list[str]) -> list[str]:
        return [check(v) for v in values]

    return run


def _meta(check: Callable[[Any], Any] | None = None, doc: str = "") -> dict[str, Any]:
    return {"check": check, "doc": doc}


@dataclass(frozen=True)
class GatewaySection:
    domain: str = field(metadata=_meta(_domain))
    data_dir: str = "var"
    secret_env: str = "SUPPORTGATE_SECRET"
    brand: str = "Support"
    ticket_prefix: str = field(default="SG", metadata=_meta(_prefix))
    templates_dir: str = ""
    bounce_local: str = "bounces"
    log_json: bool = False
    log_level: str = field(default="info", metadata=_meta(_one_of("debug", "info", "warning")))
    log_redact: bool = True


@dataclass(frozen=True)
class DatabaseSection:
    url: str = "sqlite+aiosqlite:///var/supportgate.db"


@dataclass(frozen=True)
class SmtpSection:
    listen: list[str] = field(
        default_factory=lambda: ["127.0.0.1:2525"], metadata=_meta(_each(_hostport))
    )
    max_message_bytes: int = field(default=26214400, metadata=_meta(_positive))
    max_recipients: int = field(default=50, metadata=_meta(_positive))
    hostname: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    require_tls: bool = False


@dataclass(frozen=True)
class OutboundSection:
    smarthost: str = field(default="", metadata=_meta(_optional(_hostport)))
    starttls: bool = False
    tls_verify: bool = True
    ca_file: str = ""
    username: str = ""
    password_env: str = ""
    timeout_seconds: float = field(default=30.0, metadata=_meta(_positive))
    retry_deadline_hours: float = field(default=120.0, metadata=_meta(_positive))
    retry_base_seconds: float = field(default=60.0, metadata=_meta(_positive))
    pool_size: int = field(default=4, metadata=_meta(_positive))
    poll_seconds: float = field(default=1.0, metadata=_meta(_positive))
    suppress_days: float = field(default=60.0, metadata=_meta(_positive))


@dataclass(frozen=True)
class PipelineSection:
    max_attempts: int = field(default=3, metadata=_meta(_positive))
    batch: int = field(default=200, metadata=_meta(_positive))
    parse_timeout_seconds: float = field(default=20.0, metadata=_meta(_positive))
    parse_workers: int = 1  # processes for parsing; 0 parses in a thread of the gateway
    worker_process: bool = True  # serve runs pipeline, outbox and timers in a second process
    max_parts: int = field(default=500, metadata=_meta(_positive))
    max_depth: int = field(default=20, metadata=_meta(_positive))


@dataclass(frozen=True)
class Mailbox:
    address: str = field(metadata=_meta(_address))
    queue: str
    name: str = ""


@dataclass(frozen=True)
class Queue:
    name: str
    team_address: str = field(default="", metadata=_meta(_optional(_address)))
    display_name: str = ""


@dataclass(frozen=True)
class Agent:
    email: str = field(metadata=_meta(_address))
    name: str
    team: str = ""


@dataclass(frozen=True)
class AgentsSection:
    verify: list[str] = field(
        default_factory=lambda: ["token", "dkim"],
        metadata=_meta(_each(_one_of("token", "dkim", "authentication-results"))),
    )
    authserv_id: str = ""


@dataclass(frozen=True)
class StaffSection:
    domains: list[str] = field(default_factory=list, metadata=_meta(_each(_domain)))


@dataclass(frozen=True)
class TimersSection:
    nudge_after_hours: float = field(default=24.0, metadata=_meta(_positive))
    autoclose_after_hours: float = field(default=24.0, metadata=_meta(_positive))
    close_solved_after_days: float = field(default=4.0, metadata=_meta(_positive))
    escalate_after_minutes: float = field(default=60.0, metadata=_meta(_positive))
    tick_seconds: float = field(default=30.0, metadata=_meta(_positive))


@dataclass(frozen=True)
class LimitsSection:
    acks_per_ticket_per_day: int = field(default=1, metadata=_meta(_positive))
    auto_per_sender_per_hour: int = field(default=5, metadata=_meta(_positive))


@dataclass(frozen=True)
class PrioritySection:
    urgent_patterns: list[str] = field(
        default_factory=lambda: [
            r"\b(e-?mails?|mails?|messages?)\b.{0,40}"
            r"\b(not|n't|never|stopped|fail\w*|bounc\w*)\b.{0,20}"
            r"\b(sen[dt]\w*|deliver\w*|receiv\w*|arriv\w*|going out|coming in)",
            r"\b(not|n't|never|stopped|can ?not|unable to)\b.{0,20}"
            r"\b(sending|delivering|receiving|getting)\b.{0,20}\b(e-?mails?|mails?|messages?)\b",
            r"\bdeliverability\b",
            r"\bbounc(e|ed|es|ing)\b",
        ],
        metadata=_meta(_regexes),
    )
    premier_domains: list[str] = field(default_factory=list, metadata=_meta(_each(_domain)))
    oncall_address: str = field(default="", metadata=_meta(_optional(_address)))


@dataclass(frozen=True)
class HeroSection:
    agents: list[str] = field(default_factory=list, metadata=_meta(_each(_address)))
    start: str = "2026-01-05"
    period_days: int = field(default=14, metadata=_meta(_positive))


@dataclass(frozen=True)
class ForwardField:
    name: str = field(
        metadata=_meta(_one_of("customer", "link", "summary", "consequences", "timing"))
    )
    labels: list[str]


@dataclass(frozen=True)
class ForwardsSection:
    summary_min_words: int = field(default=25, metadata=_meta(_positive))
    acknowledge_customer: bool = True
    fields: list[ForwardField] = field(default_factory=list)


@dataclass(frozen=True)
class ImapAccount:
    name: str
    host: str
    user: str
    password_env: str
    queue: str
    port: int = 993
    security: str = field(default="tls", metadata=_meta(_one_of("tls", "starttls", "plain")))
    ca_file: str = ""
    folder: str = "INBOX"
    after_store: str = field(default="seen", metadata=_meta(_one_of("seen", "move")))
    move_to: str = ""
    poll_seconds: float = field(default=60.0, metadata=_meta(_positive))
    timeout_seconds: float = field(default=60.0, metadata=_meta(_positive))
    batch: int = field(default=50, metadata=_meta(_positive))
    recipient: str = field(default="", metadata=_meta(_optional(_address)))


@dataclass(frozen=True)
class MetricsSection:
    listen: str = field(default="", metadata=_meta(_optional(_hostport)))


@dataclass(frozen=True)
class Config:
    gateway: GatewaySection
    database: DatabaseSection = field(default_factory=DatabaseSection)
    smtp: SmtpSection = field(default_factory=SmtpSection)
    outbound: OutboundSection = field(default_factory=OutboundSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    mailbox: list[Mailbox] = field(default_factory=list)
    queue: list[Queue] = field(default_factory=list)
    agent: list[Agent] = field(default_factory=list)
    agents: AgentsSection = field(default_factory=AgentsSection)
    staff: StaffSection = field(default_factory=StaffSection)
    timers: TimersSection = field(default_factory=TimersSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    priority: PrioritySection = field(default_factory=PrioritySection)
    hero: HeroSection = field(default_factory=HeroSection)
    forwards: ForwardsSection = field(default_factory=ForwardsSection)
    imap: list[ImapAccount] = field(default_factory=list)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    # Not keys: where the file was and the secret read from the environment.
    path: Path = field(default=Path(DEFAULT_CONFIG), metadata={"internal": True})
    secret: bytes = field(default=b"", repr=False, metadata={"internal": True})

    # -- derived views the rest of the gateway asks for -------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @functools.cached_property
    def data_dir(self) -> Path:
        """Resolved once: every message with an attachment asks for it."""
        return (self.base_dir / self.gateway.data_dir).resolve()

    @property
    def database_url(self) -> str:
        """The URL with a relative SQLite path resolved against the config file's folder."""
        url = self.database.url
        prefix, sep, rest = url.partition(":///")
        if sep and prefix.startswith("sqlite") and rest and not rest.startswith("/"):
            path = rest.split("?", 1)
            resolved = (self.base_dir / path[0]).resolve()
            return f"{prefix}:///{resolved}" + (f"?{path[1]}" if len(path) > 1 else "")
        return url

    @property
    def bounce_address(self) -> str:
        return f"{self.gateway.bounce_local}@{self.gateway.domain}"

    def mailbox_for(self, address: str) -> Mailbox | None:
        """Our mailbox for an envelope recipient, accepting `local+token@domain` forms."""
        address = address.lower()
        local, _, domain = address.rpartition("@")
        base = f"{local.split('+', 1)[0]}@{domain}"
        for box in self.mailbox:
            if box.address in (address, base):
                return box
        return None

    def is_ours(self, address: str) -> bool:
        """Our mailboxes, their +token forms and the bounce address; people are not ours."""
        address = address.lower()
        local, _, domain = address.rpartition("@")
        if self.mailbox_for(address) is not None:
            return True
        return domain == self.gateway.domain and local.split("+", 1)[0] == self.gateway.bounce_local

    def queue_named(self, name: str) -> Queue | None:
        return next((q for q in self.queue if q.name == name), None)

    def agent_for(self, address: str) -> Agent | None:
        address = address.lower()
        return next((a for a in self.agent if a.email == address), None)

    def is_staff(self, address: str) -> bool:
        address = address.lower()
        return (
            self.agent_for(address) is not None or address.rpartition("@")[2] in self.staff.domains
        )


T = TypeVar("T")


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section and key else section or key


def _line_of(text: str, section: str, key: str, *, index: int | None = None) -> int | None:
    """Best-effort line of `key` in `[section]`, or in the index-th `[[section]]`."""
    current, seen = "", -1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?", stripped)
        if header:
            current = header.group(1)
            if current == section:
                seen += 1
                if not key and (index is None or seen == index):
                    return number
            continue
        wanted = current == section and (index is None or seen == index)
        if wanted and key and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text

    def fail(self, section: str, key: str, message: str) -> ConfigError:
        """An error naming `section.key` (array tables as `mailbox[1]`) at its line."""
        match = re.fullmatch(r"(.*?)(?:\[(\d+)\])?", section)
        assert match is not None
        index = int(match.group(2)) if match.group(2) else None
        line = _line_of(self.text, match.group(1), key, index=index)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = _join(section, key)
        return ConfigError(f"{where}: [{name}] {message}")

    def build(self, cls: type[T], data: Any, section: str) -> T:
        if not isinstance(data, Mapping):
            raise self.fail(section, "", "must be a table")
        hints = get_type_hints(cls)
        known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.75)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f"; known keys: {', '.join(known)}"
                )
                raise self.fail(section, str(key), f"unknown key{hint}")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            tp = hints[name]
            if name not in data:
                if spec.default is MISSING and spec.default_factory is MISSING:
                    raise self.fail(section, name, f"is required ({_type_name(tp)})")
                continue
            values[name] = self.value(tp, data[name], section, name, spec.metadata.get("check"))
        return cls(**values)

    def value(self, tp: Any, raw: Any, section: str, key: str, check: Any) -> Any:
        origin = get_origin(tp)
        if origin is list:
            (item,) = get_args(tp)
            if not isinstance(raw, list):
                raise self.fail(section, key, f"must be {_type_name(tp)}, not {raw!r}")
            if hasattr(item, "__dataclass_fields__"):
                result: Any = [
                    self.build(item, v, f"{_join(section, key)}[{n}]") for n, v in enumerate(raw)
                ]
            else:
                result = [self.value(item, v, section, key, None) for v in raw]
        elif hasattr(tp, "__dataclass_fields__"):
            result = self.build(tp, raw, _join(section, key))
        else:
            ok = (
                isinstance(raw, bool)
                if tp is bool
                else isinstance(raw, (int, float)) and not isinstance(raw, bool)
                if tp is float
                else isinstance(raw, tp) and not (tp is int and isinstance(raw, bool))
            )
            if not ok:
                raise self.fail(section, key, f"must be {_type_name(tp)}, not {raw!r}")
            result = float(raw) if tp is float else raw
        if check is not None:
            try:
                checked = check(result)
            except ValueError as exc:
                raise self.fail(section, key, str(exc)) from None
            result = checked
        return result


def _cross_check(loader: _Loader, cfg: Config) -> None:
    queues = {q.name for q in cfg.queue}
    if len(queues) != len(cfg.queue):
        raise loader.fail("queue", "name", "two queues share a name")
    if not cfg.mailbox:
        raise loader.fail("mailbox", "", "at least one [[mailbox]] is needed")
    for n, box in enumerate(cfg.mailbox):
        if box.queue not in queues:
            raise loader.fail(f"mailbox[{n}]", "queue", f"{box.queue!r} is not a [[queue]] name")
        if box.address.rpartition("@")[2] != cfg.gateway.domain:
            raise loader.fail(
                "mailbox",
                "address",
                f"{box.address!r} is not at gateway.domain {cfg.gateway.domain!r}",
            )
    seen_sources: set[str] = set()
    for n, account in enumerate(cfg.imap):
        source = f"imap:{account.name}"[:16]
        if source in seen_sources:
            raise loader.fail(
                f"imap[{n}]", "name", "names must differ in their first 11 characters"
            )
        seen_sources.add(source)
        if account.after_store == "move" and not account.move_to:
            raise loader.fail(f"imap[{n}]", "move_to", 'is required with after_store = "move"')
        if account.queue not in queues:
            raise loader.fail(f"imap[{n}]", "queue", f"{account.queue!r} is not a [[queue]] name")
    for address in cfg.hero.agents:
        if cfg.agent_for(address) is None:
            raise loader.fail("hero", "agents", f"{address!r} is not an [[agent]] email")
    try:
        date.fromisoformat(cfg.hero.start)
    except ValueError:
        raise loader.fail(
            "hero", "start", f"{cfg.hero.start!r} is not a date (YYYY-MM-DD)"
        ) from None
    if cfg.smtp.require_tls and not (cfg.smtp.tls_cert and cfg.smtp.tls_key):
        raise loader.fail("smtp", "require_tls", "needs tls_cert and tls_key")


def read_secret(env: Mapping[str, str], name: str, *, what: str, minimum: int = 1) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"environment variable {name} is not set: it must hold the {what}")
    if len(value) < minimum:
        raise ConfigError(
            f"environment variable {name} is too short: the {what} needs {minimum}+ characters"
        )
    return value


def load(
    path: Path | str, *, env: Mapping[str, str] | None = None, need_secret: bool = True
) -> Config:
    """Read, check and freeze the config. Raises ConfigError with one line saying what is wrong."""
    env = os.environ if env is None else env
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file (run `supportgate init` or pass --config PATH)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    loader = _Loader(path.resolve(), text)
    if "gateway" not in data:
        raise loader.fail(
            "gateway", "", "section is required (it holds domain, data_dir, secret_env)"
        )
    cfg = loader.build(Config, data, "")
    _cross_check(loader, cfg)
    secret = b""
    if need_secret:
        secret = read_secret(
            env, cfg.gateway.secret_env, what="HMAC key for tokens", minimum=32
        ).encode()
    return replace(cfg, path=path.resolve(), secret=secret)
