"""A notice as plain data, written (rendered and composed) wherever there is a core to spare.

The pipeline decides in its transaction who gets which notice; rendering the template and
composing the message need nothing from the database, so `gateway.app.Composer` does them in
a process of its own while the pipeline goes on with the next message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from responders.compose import compose
from responders.render import Renderer


@dataclass(frozen=True, slots=True)
class Draft:
    """What writing a notice takes: its template, the template's context and the keyword
    arguments of `compose` (addresses, ids, date…)."""

    name: str
    context: Mapping[str, object]
    headers: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Written:
    """A written notice: what the ticket shows of it, and the message to send."""

    subject: str
    text: str
    data: bytes


def write(renderer: Renderer, draft: Draft) -> Written:
    """Raises RenderError or ValueError (from `compose`) as writing it inline would."""
    notice = renderer.render(draft.name, draft.context)
    return Written(notice.subject, notice.text, compose(notice, **draft.headers))


# A composer process keeps one renderer per template folder, so its compiled templates are
# reused from one batch to the next.
_renderers: dict[Path | None, Renderer] = {}


def write_all(templates: Path | None, drafts: Sequence[Draft]) -> list[Written | Exception]:
    """In a composer process: `write_each` with the renderer of the `templates` folder."""
    renderer = _renderers.get(templates)
    if renderer is None:
        renderer = _renderers[templates] = Renderer(templates)
    return write_each(renderer, drafts)


def write_each(renderer: Renderer, drafts: Sequence[Draft]) -> list[Written | Exception]:
    """Each draft written, or the error that stopped it, in order."""
    results: list[Written | Exception] = []
    for draft in drafts:
        try:
            results.append(write(renderer, draft))
        except Exception as exc:
            results.append(exc)
    return results
