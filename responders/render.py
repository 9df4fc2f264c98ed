"""The notice renderer: admins edit Jinja2 templates, so they run in an immutable sandbox.

Each notice NAME is ``NAME.subject.j2`` and ``NAME.txt.j2``, optionally ``NAME.html.j2``; a file
of the same name in the admin's folder wins over the packaged default. Templates may
``{% include %}`` or ``{% extends %}`` one another (the packaged HTML ones extend
``_layout.html.j2``); files whose names start with ``_`` are building blocks, not notices.
"""

from __future__ import annotations

import operator
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path
from jinja2.sandbox import ImmutableSandboxedEnvironment

from parsing.headers import one_line

__all__ = [
    "OUTPUT_LIMIT",
    "SAMPLE_CONTEXT",
    "SUBJECT_LIMIT",
    "Notice",
    "RenderError",
    "Renderer",
    "TemplateProblem",
]

SUBJECT_LIMIT = 200
OUTPUT_LIMIT = 1_000_000  # characters per rendered part; a notice is never near this
_SUFFIXES = (".subject.j2", ".txt.j2", ".html.j2")
# Widths and repeat counts beyond this can only be an attempt to exhaust memory.
_HUGE_NUMBER = re.compile(r"(%[^a-zA-Z%]*|\{[^{}]*:[^{}]*)\d{7,}")  # in a %- or {}-spec
_MAX_POWER_BITS = 100_000
_SETTLED_NS = 2_000_000_000  # an override folder unchanged this long has settled


class RenderError(Exception):
    """A notice could not be rendered: a missing template, bad syntax, an unsafe operation."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A rendered notice: the one-line subject, the plain text, and the optional HTML."""

    subject: str
    text: str
    html: str | None


@dataclass(frozen=True, slots=True)
class TemplateProblem:
    """One thing `templates check` found, pointing at the file and line an admin must fix."""

    file: str
    line: int | None
    message: str


class _PackageLoader(BaseLoader):
    """The packaged defaults via importlib.resources, so they load from a wheel or a zip too."""

    def __init__(self, root: Traversable) -> None:
        self._root = root

    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        node = self._root
        for piece in split_template_path(template):
            node = node.joinpath(piece)
        if not node.is_file():
            raise TemplateNotFound(template)
        return node.read_text(encoding="utf-8"), str(node), lambda: True

    def list_templates(self) -> list[str]:
        return sorted(n.name for n in self._root.iterdir() if n.name.endswith(".j2"))


def _check_text(value: object) -> None:
    if isinstance(value, str) and _HUGE_NUMBER.search(value):
        raise SecurityError("a format width or precision this large is not allowed")


def _check_width(width: object) -> None:
    if isinstance(width, int) and width > OUTPUT_LIMIT:
        raise SecurityError("a width this large is not allowed")


def _check_format_args(*values: object) -> None:
    """Formatting arguments may carry a width (``%*d``, ``{:{}}``) as well as values."""
    for value in values:
        items: list[object]
        if isinstance(value, Mapping):
            items = list(value.values())
        elif isinstance(value, tuple | list):
            items = list(value)
        else:
            items = [value]
        for item in items:
            _check_text(item)
            _check_width(item)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on the operators that can allocate without output."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left).bit_length() * right > _MAX_POWER_BITS:
                    raise SecurityError("this power is too large to compute")
            return operator.pow(left, right)
        if operator_ == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(count, int):
                    if len(seq) * count > OUTPUT_LIMIT:
                        raise SecurityError("this repetition is too large")
            return operator.mul(left, right)
        if operator_ == "%":
            if isinstance(left, str):
                _check_text(left)
                _check_format_args(right)
            return operator.mod(left, right)
        return super().call_binop(context, operator_, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_text(value.__self__)
        inner = wrapped

        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_format_args(args, kwargs)
            return inner(*args, **kwargs)

        return bounded


def _bounded_filters(env: Environment) -> None:
    """Wrap the filters that take a width, so a template cannot ask for gigabytes of spaces."""
    center = env.filters["center"]
    indent = env.filters["indent"]
    format_ = env.filters["format"]

    def bounded_center(value: str, width: int = 80) -> str:
        _check_width(width)
        return str(center(value, width))

    def bounded_indent(value: str, width: int | str = 4, *args: Any, **kwargs: Any) -> str:
        _check_width(width)
        if isinstance(width, str) and len(width) > 1000:
            raise SecurityError("an indent this long is not allowed")
        return str(indent(value, width, *args, **kwargs))

    def bounded_format(value: str, *args: Any, **kwargs: Any) -> str:
        _check_text(value)
        _check_format_args(args, kwargs)
        return str(format_(value, *args, **kwargs))

    env.filters.update(center=bounded_center, indent=bounded_indent, format=bounded_format)


class Renderer:
    """Renders notices from the packaged templates, overridden file by file from an admin folder."""

    def __init__(self, override_dir: Path | None = None) -> None:
        self._override_dir = override_dir
        self._absent: dict[str, int] = {}  # optional files found missing, by folder stamp
        loaders: list[BaseLoader] = []
        if override_dir is not None:
            loaders.append(FileSystemLoader(str(override_dir)))
        loaders.append(_PackageLoader(files("templates")))
        self._loader = ChoiceLoader(loaders)
        self._env = _BoundedEnvironment(
            loader=self._loader,
            undefined=StrictUndefined,
            autoescape=_autoescape,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        _bounded_filters(self._env)

    def _exists(self, file: str) -> bool:
        """Through the environment's cache of compiled templates, which checks the override
        folder's mtimes, so a render reads no file unless an admin changed one.

        A missing file is looked for again only once the override folder changes (a file
        made, removed or renamed there changes the folder's mtime): looking through every
        loader was a quarter of rendering a notice without HTML."""
        stamp = self._folder_stamp()
        if stamp is not None and self._absent.get(file) == stamp:
            return False
        try:
            self._env.get_template(file)
        except TemplateNotFound as exc:
            if exc.name != file:
                return True  # it is there, and something it includes is not
            if stamp is not None:
                self._absent[file] = stamp
            return False
        except TemplateSyntaxError:
            return True  # rendering it reports the error
        return True

    def _folder_stamp(self) -> int | None:
        """The override folder's mtime (0 without one; -1 while it does not exist); None
        while it changed too recently to trust: within the clock's tick, a file made just
        after a look might leave the mtime as it was."""
        if self._override_dir is None:
            return 0
        try:
            mtime = os.stat(self._override_dir).st_mtime_ns
        except OSError:
            return -1
        return mtime if time.time_ns() - mtime > _SETTLED_NS else None

    def _files(self) -> list[str]:
        return sorted(set(self._env.list_templates(filter_func=lambda n: n.endswith(".j2"))))

    def names(self) -> list[str]:
        """Every notice with both a subject and a text template, defaults and overrides."""
        present = set(self._files())
        return sorted(
            name
            for name in {_notice_name(f) for f in present}
            if name
            and not name.startswith("_")
            and f"{name}.subject.j2" in present
            and f"{name}.txt.j2" in present
        )

    def render(self, name: str, context: Mapping[str, object]) -> Notice:
        """The notice ``name`` for ``context``; RenderError says what went wrong."""
        subject = self._render_file(f"{name}.subject.j2", context)
        text = self._render_file(f"{name}.txt.j2", context)
        html: str | None = None
        if self._exists(f"{name}.html.j2"):  # HTML is optional; text alone is a whole notice
            html = self._render_file(f"{name}.html.j2", context)
        return Notice(
            subject=one_line(subject, limit=SUBJECT_LIMIT),
            text=text.rstrip() + "\n",
            html=None if html is None else html.rstrip() + "\n",
        )

    def check(self, context: Mapping[str, object]) -> list[TemplateProblem]:
        """Compile and render every template against ``context``; report what an admin must fix."""
        problems: list[TemplateProblem] = []
        present = self._files()
        for name in sorted({_notice_name(f) for f in present}):
            if name and not name.startswith("_"):
                for required in (f"{name}.subject.j2", f"{name}.txt.j2"):
                    if required not in present:
                        problems.append(TemplateProblem(required, None, "missing template"))
        for file in present:
            problems.extend(self._check_file(file, context))
        return problems

    def _check_file(self, file: str, context: Mapping[str, object]) -> list[TemplateProblem]:
        try:
            template = self._env.get_template(file)
        except TemplateSyntaxError as exc:
            return [TemplateProblem(exc.filename or file, exc.lineno, exc.message or str(exc))]
        except TemplateNotFound as exc:
            return [TemplateProblem(file, None, f"cannot load: {exc}")]
        where = template.filename or file
        try:
            out = _bounded_render(template, context)
        except TemplateSyntaxError as exc:  # raised late by an include or extends
            return [TemplateProblem(exc.filename or where, exc.lineno, exc.message or str(exc))]
        except Exception as exc:  # every failure is a problem to report
            found, line = _template_frame(exc.__traceback__)
            return [TemplateProblem(found or where, line, _describe(exc))]
        if file.endswith(".subject.j2") and not one_line(out):
            return [TemplateProblem(where, None, "the subject renders empty")]
        return []

    def _render_file(self, file: str, context: Mapping[str, object]) -> str:
        try:
            template = self._env.get_template(file)
            return _bounded_render(template, context)
        except TemplateNotFound as exc:
            raise RenderError(f"no template {exc.name!r}") from None
        except TemplateSyntaxError as exc:
            where = f"{exc.filename or exc.name or file}:{exc.lineno}"
            raise RenderError(f"{where}: syntax error: {exc.message}") from None
        except RenderError:
            raise
        except Exception as exc:
            found, line = _template_frame(exc.__traceback__)
            where = f"{found or file}:{line}" if line else (found or file)
            raise RenderError(f"{where}: {_describe(exc)}") from None


def _autoescape(template_name: str | None) -> bool:
    return template_name is not None and template_name.endswith(".html.j2")


def _notice_name(file: str) -> str:
    for suffix in _SUFFIXES:
        if file.endswith(suffix):
            return file[: -len(suffix)]
    return ""


def _bounded_render(template: Template, context: Mapping[str, object]) -> str:
    parts: list[str] = []
    size = 0
    chunks: Iterator[str] = template.generate(dict(context))
    for chunk in chunks:
        size += len(chunk)
        if size > OUTPUT_LIMIT:
            raise RenderError(
                f"{template.filename or template.name}: output exceeds {OUTPUT_LIMIT} characters"
            )
        parts.append(chunk)
    return "".join(parts)


def _template_frame(tb: TracebackType | None) -> tuple[str, int | None]:
    """The innermost template file and line in a traceback (jinja2 rewrites frames to them)."""
    found, line = "", None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            found, line = filename, tb.tb_lineno
        tb = tb.tb_next
    return found, line


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UndefinedError):
        return f"undefined variable: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"unsafe operation refused by the sandbox: {exc.message}"
    if isinstance(exc, OverflowError):
        return f"refused by the sandbox: {exc}"
    if isinstance(exc, RenderError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


SAMPLE_CONTEXT: Mapping[str, object] = MappingProxyType(
    {
        "ticket": {
            "ref": "SUP-1042",
            "subject": "Export to CSV fails with a timeout",
            "status": "open",
            "priority": "normal",
            "queue": "support",
            "requester_name": "Ada Lovelace",
            "requester": "ada@customer.example",
            "assignee_name": "Sam Agent",
            "created_at": "2024-05-06T09:30:00Z",
            "url": "https://support.example.com/tickets/SUP-1042",
        },
        "mailbox": {"address": "support@example.com", "name": "Example Support"},
        "brand": "Example",
        "message": {
            "new_text": "Hi, the export still times out after 30 seconds.\nThanks, Ada",
            "from_name": "Ada Lovelace",
            "from": "ada@customer.example",
        },
        "agent": {"name": "Sam Agent", "email": "sam@example.com"},
        "extra": {
            "present": ["customer details", "link to the issue"],
            "missing": ["summary", "consequences of not acting", "time considerations"],
            "fill_in": ("Summary: \nConsequences of not acting: \nTime considerations: "),
            "errors": ["#status: 'maybe' is not one of open, pending, solved, closed"],
            "reason": "Urgent ticket from a premier customer",
            "age_minutes": 45,
            "recipient": "ada@customer.example",
            "status": "5.1.1",
            "diagnostic": "550 5.1.1 <ada@customer.example>: Recipient address rejected",
            "new_assignee_name": "Rita Specialist",
            "body": "Thanks for the details. I have reset the export job; it should run at 09:00.",
            "marker": "##- Please type your reply above this line -##",
            "summary_lines": [
                "Status: open",
                "Priority: normal",
                "Queue: support",
                "Requester: Ada Lovelace <ada@customer.example>",
            ],
        },
    }
)
