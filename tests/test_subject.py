"""Subject normalisation, header-safe lines, ticket tags and forward prefixes."""

from __future__ import annotations

import pytest

from parsing.subject import find_ticket_refs, is_forward_subject, normalise_subject, one_line

NORMALISE: list[tuple[str, str]] = [
    ("Printer broken", "Printer broken"),
    ("Re: Printer broken", "Printer broken"),
    ("RE: Printer broken", "Printer broken"),
    ("re:Printer broken", "Printer broken"),
    ("Re: Re: RE: Printer broken", "Printer broken"),
    ("Re:Re:Printer broken", "Printer broken"),
    ("RE : Imprimante en panne", "Imprimante en panne"),
    ("Fwd: Printer broken", "Printer broken"),
    ("FW: Printer broken", "Printer broken"),
    ("Fw: Re: Printer broken", "Printer broken"),
    ("AW: WG: Drucker kaputt", "Drucker kaputt"),
    ("SV: Skrivaren", "Skrivaren"),
    ("VS: Tulostin", "Tulostin"),
    ("RV: Impresora", "Impresora"),
    ("TR: Imprimante", "Imprimante"),
    ("Antw: Printer", "Printer"),
    ("Odp: Drukarka", "Drukarka"),
    ("PD: Drukarka", "Drukarka"),
    ("YNT: Yazıcı", "Yazıcı"),
    ("RIF: Stampante", "Stampante"),
    ("Réf: Imprimante", "Imprimante"),
    ("RÉF : Imprimante", "Imprimante"),
    ("Ref: Printer", "Printer"),
    ("Odg: Pisač", "Pisač"),
    ("回复: 打印机", "打印机"),
    ("答复：打印机", "打印机"),
    ("转发: 打印机", "打印机"),
    ("回覆: 印表機", "印表機"),
    ("Ответ: Принтер", "Принтер"),
    ("Отв: Принтер", "Принтер"),
    ("Re[2]: Printer", "Printer"),
    ("Re(3): Printer", "Printer"),
    ("RE [2] : Printer", "Printer"),
    ("[#SG-1042] Printer broken", "[#SG-1042] Printer broken"),
    ("Re: [#SG-1042] Printer broken", "[#SG-1042] Printer broken"),
    ("Re: [#SG-1042] Re: Printer broken", "[#SG-1042] Printer broken"),
    ("[EXTERNAL] RE: Printer", "[EXTERNAL] Printer"),
    ("  Re:   Printer \t  broken  ", "Printer broken"),
    ("Re: Printer\r\n broken", "Printer broken"),
    ("Return policy", "Return policy"),
    ("Refund: please", "Refund: please"),
    ("Renewal: 2025", "Renewal: 2025"),
    ("Re: Re: the Re: in the middle", "the Re: in the middle"),
    ("Re:", ""),
    ("", ""),
    ("[#7]", "[#7]"),
]


@pytest.mark.parametrize(("subject", "expected"), NORMALISE)
def test_normalise_subject(subject: str, expected: str) -> None:
    assert normalise_subject(subject) == expected


ONE_LINE: list[tuple[str, str]] = [
    ("plain", "plain"),
    ("line\r\nbreak", "line break"),
    ("bare\rcr and bare\nlf", "bare cr and bare lf"),
    ("nul\x00byte", "nul byte"),
    ("tab\tand\x0bvt\x0cff", "tab and vt ff"),
    ("del\x7fchar", "del char"),
    ("c1\x85nel\x9bcsi", "c1 nel csi"),
    ("line\u2028sep\u2029para", "line sep para"),
    ("bidi\u202eoverride\u202c", "bidi override"),
    ("isolate\u2066x\u2069", "isolate x"),
    ("embed\u202a\u202b\u202dx", "embed x"),
    ("  lots   of\u00a0 space  ", "lots of space"),
    ("émoji 🎉 ok", "émoji 🎉 ok"),
]


@pytest.mark.parametrize(("value", "expected"), ONE_LINE)
def test_one_line(value: str, expected: str) -> None:
    assert one_line(value) == expected


def test_one_line_limit() -> None:
    assert one_line("x" * 2000) == "x" * 998
    assert one_line("abc def", limit=4) == "abc"
    assert one_line("abcdef", limit=0) == ""
    with pytest.raises(ValueError, match="limit"):
        one_line("x", limit=-1)


REFS: list[tuple[str, tuple[str, ...]]] = [
    ("[#SG-1042] Printer", ("SG-1042",)),
    ("Re: [#sg-1042] Printer", ("SG-1042",)),
    ("[#1042]", ("1042",)),
    ("[#SG-1] and [#OPS-22]", ("SG-1", "OPS-22")),
    ("[#SG-1] again [#SG-1]", ("SG-1",)),
    ("[SG-1042] no hash", ()),
    ("[# SG-1042] space", ()),
    ("[#SG1042] no dash", ()),
    ("[#ABCDEFGHIJK-1] prefix too long", ()),
    ("[#SG-1234567890123] number too long", ()),
    ("[#SG-١٢٣] not ASCII digits", ()),
    ("#SG-1042 without brackets", ()),
    ("", ()),
]


@pytest.mark.parametrize(("subject", "expected"), REFS)
def test_find_ticket_refs(subject: str, expected: tuple[str, ...]) -> None:
    assert find_ticket_refs(subject) == expected


FORWARDS: list[tuple[str, bool]] = [
    ("Fwd: Printer", True),
    ("FWD: Printer", True),
    ("Fw: Printer", True),
    ("FW: Printer", True),
    ("WG: Drucker", True),
    ("TR: Imprimante", True),
    ("RV: Impresora", True),
    ("VS: Skriver", True),
    ("PD: Drukarka", True),
    ("Doorst: Printer", True),
    ("I: Stampante", True),
    ("i: stampante", True),
    ("转发: 打印机", True),
    ("[EXTERNAL] FW: Printer", True),
    ("Fwd: Re: Printer", True),
    ("Re: Fwd: Printer", False),
    ("AW: WG: Drucker", False),
    ("Re: Printer", False),
    ("Printer FW: later", False),
    ("Fwdx: Printer", False),
    ("Information: Printer", False),
    ("", False),
]


@pytest.mark.parametrize(("subject", "expected"), FORWARDS)
def test_is_forward_subject(subject: str, expected: bool) -> None:
    assert is_forward_subject(subject) is expected
