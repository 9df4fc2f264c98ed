"""The notice renderer: defaults, admin overrides, `templates check`, and the sandbox."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# The repo root is not on sys.path under plain `pytest` (no conftest or pythonpath setting yet).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from responders.render import (
    OUTPUT_LIMIT,
    SAMPLE_CONTEXT,
    SUBJECT_LIMIT,
    Renderer,
    RenderError,
)

NOTICES = [
    "acknowledgement",
    "agent_notification",
    "agent_reply",
    "auto_close",
    "blind_forward_refusal",
    "close",
    "command_error",
    "delivery_failure",
    "escalation",
    "more_info",
    "nudge",
    "reassigned",
    "researching",
    "solved",
    "unverified_agent",
]
CUSTOMER_FACING = [
    "acknowledgement",
    "agent_reply",
    "auto_close",
    "close",
    "more_info",
    "nudge",
    "reassigned",
    "researching",
    "solved",
]
NUDGE = (
    "Just checking in to see if this is still an issue. To keep things tidy, we'll close the "
    "ticket out tomorrow if we haven't heard from you (but we absolutely want to help you with "
    "this!)"
)


def _override(tmp_path: Path, files: dict[str, str]) -> Renderer:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return Renderer(tmp_path)


def test_names_lists_every_default_notice() -> None:
    assert Renderer().names() == NOTICES


@pytest.mark.parametrize("name", NOTICES)
def test_every_default_renders_against_the_sample(name: str) -> None:
    notice = Renderer().render(name, SAMPLE_CONTEXT)
    assert notice.subject and "\n" not in notice.subject
    assert notice.text.strip()
    assert "[#SUP-1042]" in notice.subject
    assert (notice.html is not None) == (name in CUSTOMER_FACING)


def test_defaults_pass_check() -> None:
    assert Renderer().check(SAMPLE_CONTEXT) == []


def test_blind_forward_refusal_needs_no_ticket_ref() -> None:
    context = dict(SAMPLE_CONTEXT)
    context["ticket"] = {**SAMPLE_CONTEXT["ticket"], "ref": ""}  # type: ignore[dict-item]
    notice = Renderer().render("blind_forward_refusal", context)
    assert notice.subject.startswith("Missing context")
    assert "Summary: \nConsequences of not acting: " in notice.text


def test_nudge_carries_the_exact_sentence() -> None:
    notice = Renderer().render("nudge", SAMPLE_CONTEXT)
    assert NUDGE in notice.text
    assert notice.html is not None and NUDGE in notice.html


def test_agent_notification_starts_with_the_marker() -> None:
    notice = Renderer().render("agent_notification", SAMPLE_CONTEXT)
    extra = SAMPLE_CONTEXT["extra"]
    assert isinstance(extra, dict)
    assert notice.text.startswith(extra["marker"] + "\n")
    assert "the export still times out" in notice.text


def test_command_error_lists_the_valid_commands() -> None:
    text = Renderer().render("command_error", SAMPLE_CONTEXT).text
    for command in ("#status open|pending|solved|closed", "#assign EMAIL|NAME|me", "#note"):
        assert command in text
    assert "'maybe' is not one of" in text


def test_html_is_escaped_and_text_is_not() -> None:
    context = dict(SAMPLE_CONTEXT)
    context["ticket"] = {**SAMPLE_CONTEXT["ticket"], "subject": "<script>x</script> & co"}  # type: ignore[dict-item]
    notice = Renderer().render("acknowledgement", context)
    assert notice.html is not None
    assert "<script>" not in notice.html and "&lt;script&gt;" in notice.html
    assert "<script>x</script> & co" in notice.text


def test_subject_is_one_line_without_controls_and_capped() -> None:
    context = dict(SAMPLE_CONTEXT)
    hostile = "a\r\nBcc: x@evil\u2028b\u202ec\x85d\x7f" + "e" * 500
    context["ticket"] = {**SAMPLE_CONTEXT["ticket"], "subject": hostile}  # type: ignore[dict-item]
    subject = Renderer().render("acknowledgement", context).subject
    assert subject.startswith("[#SUP-1042] a Bcc: x@evil b c d e")
    assert len(subject) == SUBJECT_LIMIT
    assert all(ch.isprintable() for ch in subject)


def test_override_wins_by_name(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"nudge.txt.j2": "Custom nudge for {{ ticket.ref }}\n"})
    notice = renderer.render("nudge", SAMPLE_CONTEXT)
    assert notice.text == "Custom nudge for SUP-1042\n"
    assert notice.subject.startswith("[#SUP-1042]")  # the default subject still applies
    assert renderer.render("solved", SAMPLE_CONTEXT).text.startswith("Hi Ada")


def test_an_html_part_added_later_is_found(tmp_path: Path) -> None:
    """Missing optional files are remembered until the override folder changes, and a folder
    changed within the last seconds is looked through each time."""
    renderer = Renderer(tmp_path)
    settled = time.time() - 60
    os.utime(tmp_path, (settled, settled))
    assert renderer.render("escalation", SAMPLE_CONTEXT).html is None
    assert renderer.render("escalation", SAMPLE_CONTEXT).html is None  # from the memory
    (tmp_path / "escalation.html.j2").write_text("<p>{{ ticket.ref }}</p>", encoding="utf-8")
    assert renderer.render("escalation", SAMPLE_CONTEXT).html == "<p>SUP-1042</p>\n"
    (tmp_path / "escalation.html.j2").unlink()
    assert renderer.render("escalation", SAMPLE_CONTEXT).html is None  # changed just now
    (tmp_path / "escalation.html.j2").write_text("<p>third</p>", encoding="utf-8")
    assert renderer.render("escalation", SAMPLE_CONTEXT).html == "<p>third</p>\n"


def test_override_may_add_a_new_notice(tmp_path: Path) -> None:
    renderer = _override(
        tmp_path, {"survey.subject.j2": "How did we do?", "survey.txt.j2": "Rate us"}
    )
    assert "survey" in renderer.names()
    assert renderer.render("survey", SAMPLE_CONTEXT).html is None


def test_check_reports_undefined_variable_with_file_and_line(tmp_path: Path) -> None:
    renderer = _override(
        tmp_path, {"solved.txt.j2": "Hello {{ ticket.ref }}\n\nline three {{ ticket.nope }}\n"}
    )
    problems = renderer.check(SAMPLE_CONTEXT)
    assert len(problems) == 1
    (problem,) = problems
    assert problem.file == str(tmp_path / "solved.txt.j2")
    assert problem.line == 3
    assert "nope" in problem.message and "undefined" in problem.message


def test_check_reports_syntax_error_with_file_and_line(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"close.txt.j2": "one\ntwo\n{% if ticket.ref %}\nthree\n"})
    (problem,) = renderer.check(SAMPLE_CONTEXT)
    assert problem.file == str(tmp_path / "close.txt.j2")
    assert problem.line is not None and problem.line >= 3
    with pytest.raises(RenderError, match=r"close\.txt\.j2"):
        renderer.render("close", SAMPLE_CONTEXT)


def test_check_reports_error_inside_an_included_file(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"_footer.txt.j2": "\n\n{{ brand.missing_thing }}\n"})
    problems = renderer.check(SAMPLE_CONTEXT)
    assert problems
    assert {p.file for p in problems} == {str(tmp_path / "_footer.txt.j2")}
    assert {p.line for p in problems} == {3}


def test_check_reports_a_notice_missing_its_text(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"orphan.subject.j2": "x"})
    problems = renderer.check(SAMPLE_CONTEXT)
    assert [(p.file, p.message) for p in problems] == [("orphan.txt.j2", "missing template")]


def test_unknown_notice_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="no template"):
        Renderer().render("no_such_notice", SAMPLE_CONTEXT)


def test_undefined_variable_is_a_render_error_at_render_time() -> None:
    with pytest.raises(RenderError, match="undefined"):
        Renderer().render("acknowledgement", {"brand": "x"})


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ ticket._private }}",
    "{{ ticket.__class__ }}",
    "{{ ticket.update({'ref': 'x'}) }}",
    "{{ extra.present.append('x') }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 10 ** 10 ** 10 }}",
    "{{ 'x' * 10**9 }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ 'x'|center(999999999) }}",
    "{{ lipsum.__globals__ }}",
    "{{ self.__init__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_never_run_code(tmp_path: Path, source: str) -> None:
    renderer = _override(tmp_path, {"solved.txt.j2": source})
    try:
        text = renderer.render("solved", SAMPLE_CONTEXT).text
    except RenderError as exc:
        assert "solved.txt.j2" in str(exc)
    else:  # harmless output only: nothing from Python's insides
        assert "<class" not in text and "function" not in text and "module" not in text
    ticket = SAMPLE_CONTEXT["ticket"]
    assert isinstance(ticket, dict) and ticket["ref"] == "SUP-1042"


def test_security_error_says_what_was_refused(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"solved.txt.j2": "{{ cycler.__init__.__globals__ }}"})
    with pytest.raises(RenderError, match="unsafe"):
        renderer.render("solved", SAMPLE_CONTEXT)


def test_huge_output_is_refused(tmp_path: Path) -> None:
    source = "{% for i in range(100000) %}{% for j in range(100) %}xx{% endfor %}{% endfor %}"
    renderer = _override(tmp_path, {"solved.txt.j2": source})
    with pytest.raises(RenderError, match=str(OUTPUT_LIMIT)):
        renderer.render("solved", SAMPLE_CONTEXT)
    (problem,) = renderer.check(SAMPLE_CONTEXT)
    assert problem.file.endswith("solved.txt.j2")


def test_template_names_cannot_escape_the_folders(tmp_path: Path) -> None:
    (tmp_path / "admin").mkdir()
    (tmp_path / "secret.txt.j2").write_text("top secret")
    renderer = _override(
        tmp_path / "admin", {"x.subject.j2": "s", "x.txt.j2": "{% include '../secret.txt.j2' %}"}
    )
    with pytest.raises(RenderError):
        renderer.render("x", SAMPLE_CONTEXT)
    with pytest.raises(RenderError):
        renderer.render("../secret", SAMPLE_CONTEXT)


@pytest.mark.parametrize(
    "source",
    [
        "{{ '{:>{}}'.format(1, 999999999) }}",
        "{{ '{:>{w}}'.format(1, w=999999999) }}",
        "{{ '{x:>999999999}'.format_map({'x': 1}) }}",
        "{{ '%*d' % (999999999, 1) }}",
    ],
)
def test_format_widths_are_bounded(tmp_path: Path, source: str) -> None:
    renderer = _override(tmp_path, {"solved.txt.j2": source})
    with pytest.raises(RenderError, match="not allowed"):
        renderer.render("solved", SAMPLE_CONTEXT)


def test_format_filter_widths_are_bounded(tmp_path: Path) -> None:
    renderer = _override(tmp_path, {"solved.txt.j2": "{{ '%*d'|format(999999999, 1) }}"})
    with pytest.raises(RenderError, match="not allowed"):
        renderer.render("solved", SAMPLE_CONTEXT)


def test_long_numbers_outside_format_specs_are_fine(tmp_path: Path) -> None:
    source = (
        "{{ 'Order 12345678 for %s'|format(ticket.ref) }} {{ 'Call {} on 5551234567'.format(1) }}"
    )
    renderer = _override(tmp_path, {"solved.txt.j2": source})
    text = renderer.render("solved", SAMPLE_CONTEXT).text
    assert text == "Order 12345678 for SUP-1042 Call 1 on 5551234567\n"
