"""Quoted-reply stripping and HTML rendering, against real-world corpora and named cases."""

from __future__ import annotations

import email
import json
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from parsing.quoted import extract_new_text, html_to_text

CORPUS = Path(__file__).parent / "corpus"
TRIMMER = CORPUS / "email_reply_trimmer" / "quoted-reply"
CRISP = CORPUS / "crisp-email-reply-parser" / "quoted-reply"
ZAPIER = CORPUS / "zapier-email-reply-parser" / "quoted-reply"
DJANGO = CORPUS / "django-helpdesk" / "quoted-reply"
_SIDE_FILES = (".trimmed.txt", ".elided.txt", ".embedded.txt", ".before.txt")


def _norm(text: str) -> str:
    """Whitespace-insensitive form: other tools disagree with us on blank lines and wrapping."""
    return " ".join(text.split())


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Where we deliberately disagree with another tool's expected output

DELIBERATE: dict[str, tuple[str, str]] = {
    # fixture: (our expected new text, why the upstream expectation is not ours)
    "email_reply_trimmer/quote_only.txt": (
        "",
        "the whole message is a '>' quote with nothing above it; upstream falls back to keeping"
        " the quote, we report that the sender wrote nothing",
    ),
    "email_reply_trimmer/forwarded_message.txt": (
        "",
        "a forward's own text is what sits above the separator (here nothing); upstream returns"
        " the forwarded body, which the forward detector reads separately",
    ),
    "email_reply_trimmer/embedded_email_17.txt": (
        "",
        "starts with an attribution followed by unprefixed text, which is indistinguishable from"
        " history quoted without '>' (as in dual_embedded); upstream keeps it as a bottom post",
    ),
}


def _trimmer_cases() -> list[tuple[str, str, str]]:
    cases = []
    for path in sorted(TRIMMER.glob("*.txt")):
        if path.name.endswith(_SIDE_FILES):
            continue
        expected = _read(path.with_name(path.name[:-4] + ".trimmed.txt"))
        cases.append((f"email_reply_trimmer/{path.name}", _read(path), expected))
    return cases


def _crisp_cases() -> list[tuple[str, str, str]]:
    cases = []
    for path in sorted(CRISP.glob("*.txt")):
        data = json.loads(_read(path.with_name(path.name[:-4] + ".expected.json")))
        expected = data.get("expected_first_fragment_trimmed", data.get("expected_visible_text"))
        assert isinstance(expected, str), path
        cases.append((f"crisp/{path.name}", _read(path), expected))
    return cases


def _zapier_exact_cases() -> list[tuple[str, str, str]]:
    cases = []
    for path in sorted(ZAPIER.glob("*.txt")):
        data = json.loads(_read(path.with_name(path.name[:-4] + ".expected.json")))
        if "expected_reply" in data:
            cases.append((f"zapier/{path.name}", _read(path), data["expected_reply"]))
    return cases


def _django_cases() -> list[tuple[str, str, str]]:
    raw = (DJANGO / "forwarded-message.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    # upstream asserts the ticket description is the text above "-----Original Message-----"
    return [("django-helpdesk/forwarded-message.eml", body.get_content(), "This is email body")]


UPSTREAM = _trimmer_cases() + _crisp_cases() + _zapier_exact_cases() + _django_cases()


@pytest.mark.parametrize(("name", "text", "expected"), UPSTREAM, ids=[c[0] for c in UPSTREAM])
def test_corpus_fixture(name: str, text: str, expected: str) -> None:
    if name in DELIBERATE:
        expected = DELIBERATE[name][0]
    assert _norm(extract_new_text(text)) == _norm(expected)


def test_corpus_agreement_rate() -> None:
    """How often we agree with the upstream tools' own expectations, deliberate cases included."""
    agreed = [_norm(extract_new_text(text)) == _norm(exp) for _name, text, exp in UPSTREAM]
    rate = sum(agreed) / len(agreed)
    print(f"quoted-reply corpus: {sum(agreed)}/{len(agreed)} agree with upstream ({rate:.1%})")
    assert rate >= 0.95
    assert len(agreed) - sum(agreed) == len(DELIBERATE)


# Zapier's other fixtures assert fragment flags rather than a reply string; these rows are what
# those flags imply for the visible reply (first line, last line). Where upstream marks a
# sign-off such as "-Abhishek Kona" as a signature fragment we keep it: it is the sender's text.
ZAPIER_BOUNDS: list[tuple[str, str, str]] = [
    ("correct_sig", "this is an email with a correct -- signature.", "*"),
    ("email_1_1", "Hi folks", "-Abhishek Kona"),
    ("email_1_2", "Hi,", 'the keys in a bucket, you’ll need to delete them all individually."'),
    ("email_1_3", "Oh thanks.", "-Abhishek Kona"),
    ("email_1_4", "Awesome! I haven't had another problem with it.", "*"),
    ("email_1_5", "One: Here's what I've got.", "for a while."),
    ("email_1_6", "I get proper rendering as well.", "Sent from a magnificent torch of pixels"),
    ("email_1_7", ":+1:", "*"),
    ("email_1_8", "I will reply under this one", "and under this."),
    ("email_BlackBerry", "Here is another email", "*"),
    ("email_bullets", "test 2 this should list second", "- and another"),
    ("email_iPhone", "Here is another email", "*"),
    ("email_multi_word_sent_from_my_mobile_device", "Here is another email", "*"),
    (
        "email_one_is_not_on",
        "Thank, this is really helpful.",
        "Locally (on development), when I run...",
    ),
    (
        "email_partial_quote_header",
        "On your remote host you can run:",
        "fails, the tunnel is not working.",
    ),
    (
        "email_sent_from_my_not_signature",
        "Here is another email",
        "Sent from my desk, is much easier then my mobile phone.",
    ),
    ("email_sig_delimiter_in_middle_of_line", "Hi there!", "kthxbai"),
    ("greedy_on", "On your remote host you can run:", "fails, the tunnel is not working."),
    (
        "pathological",
        "I think you're onto something. I will try to fix the problem as soon as I",
        "get back to a computer.",
    ),
]


@pytest.mark.parametrize(("fixture", "first", "last"), ZAPIER_BOUNDS)
def test_zapier_fixture_bounds(fixture: str, first: str, last: str) -> None:
    lines = extract_new_text(_read(ZAPIER / f"{fixture}.txt")).split("\n")
    assert lines[0].strip() == first
    assert lines[-1].strip() == (first if last == "*" else last)
    assert not any(line.startswith(">") for line in lines)


# --------------------------------------------------------------------------------------------
# Named cases: clients, languages, forwards, and text that must survive

NAMED: list[tuple[str, str, str]] = [
    (
        "gmail-reply",
        "Thanks, works now.\n\nOn Mon, 3 Mar 2025 at 10:00, Support <support@example.com> wrote:\n"
        "\n> Please try again.\n>\n",
        "Thanks, works now.",
    ),
    (
        "gmail-reply-attribution-wrapped",
        "Works.\n\nOn Mon, Mar 3, 2025 at 10:00 AM Support Team of Example <\n"
        "support@example.com> wrote:\n\n> Please try again.\n",
        "Works.",
    ),
    (
        "gmail-reply-attribution-wrapped-before-wrote",
        "Works.\n\nOn Mon, Mar 3, 2025 at 10:00 AM Support <support@example.com>\nwrote:\n\n> Hi\n",
        "Works.",
    ),
    (
        "gmail-reply-no-blank-line-before-attribution",
        "Works.\nOn Mon, Mar 3, 2025 at 10:00 AM Support <support@example.com> wrote:\n> Hi\n",
        "Works.",
    ),
    (
        "gmail-reply-with-signature",
        "Works.\n\n-- \nJane Doe\nACME Corp\n\nOn Mon, Mar 3, 2025 at 10:00 AM Support "
        "<support@example.com> wrote:\n> Hi\n",
        "Works.",
    ),
    (
        "outlook-desktop-original-message",
        "Please close it.\n\n-----Original Message-----\nFrom: Support <support@example.com>\n"
        "Sent: Monday, March 3, 2025 10:00 AM\nTo: Jane <jane@acme.example>\nSubject: RE: Printer\n"
        "\nDid that help?\n",
        "Please close it.",
    ),
    (
        "outlook-web-underscores",
        "Still broken.\n\n________________________________\nFrom: Support <support@example.com>\n"
        "Sent: Monday, March 3, 2025 10:00\nTo: Jane\nSubject: RE: Printer\n\nDid that help?\n",
        "Still broken.",
    ),
    (
        "outlook-header-block-without-separator",
        "See below.\n\nFrom: Support [mailto:support@example.com]\nSent: Monday, March 3, 2025\n"
        "To: Jane\nSubject: Printer\n\nDid that help?\n",
        "See below.",
    ),
    (
        "outlook-bold-labels",
        "Done.\n\n*From:* Support [mailto:support@example.com]\n*Sent:* Monday, March 3, 2025\n"
        "*To:* Jane\n*Subject:* Printer\n\nOld text\n",
        "Done.",
    ),
    (
        "outlook-german",
        "Danke!\n\nVon: Support <support@example.com>\nGesendet: Montag, 3. März 2025 10:00\n"
        "An: Jane <jane@acme.example>\nBetreff: AW: Drucker\n\nAlter Text\n",
        "Danke!",
    ),
    (
        "outlook-french",
        "Merci.\n\nDe : Support <support@example.com>\nEnvoyé : lundi 3 mars 2025 10:00\n"
        "À : Jane\nObjet : RE: Imprimante\n\nAncien texte\n",
        "Merci.",
    ),
    (
        "outlook-spanish",
        "Gracias.\n\nDe: Support <support@example.com>\nEnviado: lunes, 3 de marzo de 2025 10:00\n"
        "Para: Jane\nAsunto: RE: Impresora\n\nTexto antiguo\n",
        "Gracias.",
    ),
    (
        "outlook-italian",
        "Grazie.\n\nDa: Support <support@example.com>\nInviato: lunedì 3 marzo 2025 10:00\n"
        "A: Jane\nOggetto: R: Stampante\n\nVecchio testo\n",
        "Grazie.",
    ),
    (
        "outlook-dutch",
        "Bedankt.\n\nVan: Support <support@example.com>\nVerzonden: maandag 3 maart 2025 10:00\n"
        "Aan: Jane\nOnderwerp: RE: Printer\n\nOude tekst\n",
        "Bedankt.",
    ),
    (
        "outlook-swedish",
        "Tack.\n\nFrån: Support <support@example.com>\nSkickat: den 3 mars 2025 10:00\n"
        "Till: Jane\nÄmne: SV: Skrivare\n\nGammal text\n",
        "Tack.",
    ),
    (
        "outlook-polish",
        "Dzięki.\n\nOd: Support <support@example.com>\nWysłano: poniedziałek, 3 marca 2025 10:00\n"
        "Do: Jane\nTemat: ODP: Drukarka\n\nStary tekst\n",
        "Dzięki.",
    ),
    (
        "outlook-japanese",
        "ありがとうございます。\n\n差出人: Support <support@example.com>\n"
        "送信日時: 2025年3月3日 10:00\n"
        "宛先: Jane\n件名: RE: プリンター\n\n古いテキスト\n",
        "ありがとうございます。",
    ),
    (
        "apple-mail-iphone",
        "Sure.\n\nSent from my iPhone\n\n> On 3 Mar 2025, at 10:00, Support <support@example.com>"
        " wrote:\n>\n> Hi\n",
        "Sure.",
    ),
    (
        "apple-mail-desktop",
        "Sure.\n\n> On 3 Mar 2025, at 10:00, Support <support@example.com> wrote:\n>\n> Hi\n",
        "Sure.",
    ),
    (
        "thunderbird-reply",
        "Reply above.\n\nOn 03/03/2025 10:00, Support wrote:\n> Hi\n",
        "Reply above.",
    ),
    (
        "thunderbird-bottom-post-with-signature",
        "On 03/03/2025 10:00, Support wrote:\n> Does it work now?\n\nYes, thanks.\n\n-- \nJane\n",
        "Yes, thanks.",
    ),
    (
        "french-gmail",
        "Merci.\n\nLe lun. 3 mars 2025 à 10:00, Support <support@example.com> a écrit :\n> Salut\n",
        "Merci.",
    ),
    (
        "german-gmail",
        "Danke.\n\nAm Mo., 3. März 2025 um 10:00 Uhr schrieb Support <support@example.com>:\n"
        "> Hi\n",
        "Danke.",
    ),
    (
        "spanish-gmail",
        "Gracias.\n\nEl lun, 3 mar 2025 a las 10:00, Support (<support@example.com>) escribió:\n"
        "> Hola\n",
        "Gracias.",
    ),
    (
        "italian-gmail",
        "Grazie.\n\nIl giorno lun 3 mar 2025 alle ore 10:00 Support <support@example.com> ha "
        "scritto:\n> Ciao\n",
        "Grazie.",
    ),
    (
        "dutch-gmail",
        "Bedankt.\n\nOp ma 3 mrt 2025 om 10:00 schreef Support <support@example.com>:\n> Hoi\n",
        "Bedankt.",
    ),
    (
        "swedish-gmail",
        "Tack.\n\nDen mån 3 mars 2025 kl 10:00 skrev Support <support@example.com>:\n> Hej\n",
        "Tack.",
    ),
    (
        "japanese-gmail",
        "了解です。\n\n2025年3月3日(月) 10:00 Support <support@example.com>:\n\n> こんにちは\n",
        "了解です。",
    ),
    (
        "chinese-gmail",
        "好的。\n\nSupport <support@example.com> 于2025年3月3日周一 10:00写道：\n\n> 你好\n",
        "好的。",
    ),
    (
        "russian-gmail",
        "Спасибо.\n\nпн, 3 мар. 2025 г. в 10:00, Support <support@example.com>:\n\n> Привет\n",
        "Спасибо.",
    ),
    (
        "gmail-forward",
        "FYI, see below.\n\n---------- Forwarded message ---------\nFrom: Jane <jane@acme.example>"
        "\nDate: Mon, 3 Mar 2025 at 10:00\nSubject: Printer\nTo: <sam@example.com>\n\n"
        "It is broken.\n",
        "FYI, see below.",
    ),
    (
        "gmail-forward-german",
        "Bitte übernehmen.\n\n---------- Weitergeleitete Nachricht ---------\nVon: Jane\n\nText\n",
        "Bitte übernehmen.",
    ),
    (
        "apple-forward",
        "Please handle.\n\nBegin forwarded message:\n\nFrom: Jane <jane@acme.example>\n"
        "Subject: Printer\n\nIt is broken.\n",
        "Please handle.",
    ),
    (
        "thunderbird-forward",
        "Over to you.\n\n-------- Forwarded Message --------\nSubject: Printer\n\nIt is broken.\n",
        "Over to you.",
    ),
    (
        "blind-forward-nothing-above",
        "---------- Forwarded message ---------\nFrom: Jane <jane@acme.example>\n\nIt is broken.\n",
        "",
    ),
    ("whole-message-quoted", "> On Mon, 3 Mar 2025, Support wrote:\n> Hi\n>\n", ""),
    ("bottom-post", "> Does it work?\n\nYes.\n", "Yes."),
    (
        "inline-answers",
        "On Mon, 3 Mar 2025 at 10:00, Support <support@example.com> wrote:\n> Which version?\n\n"
        "4.2\n\n> Which OS?\n\nLinux\n",
        "4.2\n\nLinux",
    ),
    (
        "wrapped-quote-line-is-not-new-text",
        "Reply.\n\n> "
        + "a quoted line long enough that a client re-wrapped it and lost the"
        + "\nmarker on its tail\n> more quote\n",
        "Reply.",
    ),
    ("mobile-signature-german", "Passt.\n\nVon meinem iPhone gesendet\n", "Passt."),
    ("mobile-signature-french", "D'accord.\n\nEnvoyé de mon iPhone\n", "D'accord."),
    ("outlook-mobile-promo", "Ok.\n\nGet Outlook for Android<https://aka.ms/ghei36>\n", "Ok."),
    (
        "crlf-line-endings",
        "Fine.\r\n\r\nOn Mon, 3 Mar 2025, X <x@example.com> wrote:\r\n> a\r\n",
        "Fine.",
    ),
    ("leading-blank-lines", "\n\n  Indented first line\nsecond\n", "  Indented first line\nsecond"),
    # text that looks a little like a marker and must survive
    (
        "plain-text",
        "Hello,\n\nthe printer is broken.\n\nJane",
        "Hello,\n\nthe printer is broken.\n\nJane",
    ),
    ("dash-in-line", "It works -- mostly.\nJane", "It works -- mostly.\nJane"),
    (
        "on-sentence-without-date",
        "On Monday I restarted the server and it wrote:\nerror: disk full\n",
        "On Monday I restarted the server and it wrote:\nerror: disk full",
    ),
    (
        "sentence-mentioning-an-address",
        "I wrote to support@example.com on 3 May 2024 about this:\n\nNothing happened.",
        "I wrote to support@example.com on 3 May 2024 about this:\n\nNothing happened.",
    ),
    (
        "sent-from-in-a-sentence",
        "Where is it?\nSent from the warehouse on Monday, still not here.",
        "Where is it?\nSent from the warehouse on Monday, still not here.",
    ),
    (
        "labels-that-are-not-headers",
        "Customer: ACME\nDate: tomorrow\nLink: https://example.com/1",
        "Customer: ACME\nDate: tomorrow\nLink: https://example.com/1",
    ),
    ("arrow-in-text", "Settings -> Printers\n=> restart", "Settings -> Printers\n=> restart"),
]


@pytest.mark.parametrize(("name", "text", "expected"), NAMED, ids=[c[0] for c in NAMED])
def test_named_case(name: str, text: str, expected: str) -> None:
    assert extract_new_text(text) == expected


@pytest.mark.parametrize(("name", "text", "expected"), NAMED, ids=[c[0] for c in NAMED])
def test_content_above_a_quote_is_never_lost(name: str, text: str, expected: str) -> None:
    """Whatever follows, a line the sender wrote at the top survives."""
    assert extract_new_text("Top line.\n" + text).startswith("Top line.")
    assert extract_new_text("Top line.\n\n" + text).startswith("Top line.")


def test_empty_and_blank_input() -> None:
    assert extract_new_text("") == ""
    assert extract_new_text("\n \n\t\n") == ""


def test_trailing_whitespace_is_stripped_and_inner_text_untouched() -> None:
    text = "Line one  \n\n\n  indented\ttab\n\n"
    assert extract_new_text(text) == "Line one  \n\n\n  indented\ttab"


# --------------------------------------------------------------------------------------------
# HTML

HTML: list[tuple[str, str, str]] = [
    ("paragraphs-and-br", "<p>Hello</p><p>line one<br>line two</p>", "Hello\n\nline one\nline two"),
    (
        "div-lines",
        "<div>one</div><div>two</div><div><br></div><div>three</div>",
        "one\ntwo\n\nthree",
    ),
    (
        "list-items",
        "<ul><li>one</li><li>two<ul><li>deep</li></ul></li></ul>",
        "- one\n- two\n  - deep",
    ),
    ("unclosed-list-items", "<ul><li>one<li>two</ul>after", "- one\n- two\n\nafter"),
    (
        "link-text-differs",
        '<a href="https://example.com/x">the report</a>',
        "the report <https://example.com/x>",
    ),
    (
        "link-text-is-url",
        '<a href="https://example.com/">https://example.com</a>',
        "https://example.com",
    ),
    (
        "mailto-link",
        '<a href="mailto:jane@acme.example">jane@acme.example</a>',
        "jane@acme.example",
    ),
    ("image-only-link", '<a href="https://t.example/c"><img src="x.png"></a>Hi', "Hi"),
    (
        "blockquote",
        "<p>Yes.</p><blockquote><p>Q?</p><blockquote>older</blockquote></blockquote>",
        "Yes.\n\n> Q?\n>\n> > older",
    ),
    (
        "script-style-head",
        "<html><head><title>T</title><style>p{color:red}</style></head><body><script>x=1</script>Hi</body></html>",
        "Hi",
    ),
    ("unclosed-head", "<html><head><title>T</title><body>Hi", "Hi"),
    ("entities", "<p>Fish &amp; chips &lt;3 &#169; &eacute;t&eacute;</p>", "Fish & chips <3 © été"),
    ("whitespace-collapsed", "<p>  a\n   b\t\tc  </p>", "a b c"),
    ("nbsp-line", "<div>a</div><div>&nbsp;</div><div>b</div>", "a\n\nb"),
    ("pre-kept", "<pre>  x = 1\n    y = 2</pre>", "  x = 1\n    y = 2"),
    (
        "table-rows",
        "<table><tr><td>Name</td><td>Value</td></tr><tr><td>a</td><td>1</td></tr></table>",
        "Name Value\na 1",
    ),
    ("stray-angle-brackets", "a < b and c > d; x<y", "a < b and c > d; x<y"),
    ("unclosed-comment", "Hi<!-- hidden", "Hi"),
    ("declarations", "<!DOCTYPE html><?xml version='1.0'?><![if !vml]>Hi<![endif]>", "Hi"),
    ("misnested", "<b><i>bold italic</b> plain</i><p>next", "bold italic plain\n\nnext"),
    (
        "gmail-signature",
        '<div>Thanks</div><div class="gmail_signature">Jane</div>',
        "Thanks\n-- \nJane",
    ),
]


@pytest.mark.parametrize(("name", "html", "expected"), HTML, ids=[c[0] for c in HTML])
def test_html_to_text(name: str, html: str, expected: str) -> None:
    assert html_to_text(html) == expected


OUTLOOK_WEB_REPLY = """<html><head><style>P {margin:0}</style></head><body dir="ltr">
<div class="elementToProof">Yes, please close the ticket.</div>
<div id="appendonsend"></div>
<hr style="display:inline-block;width:98%" tabindex="-1">
<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri">
<b>From:</b> Support &lt;support@example.com&gt;<br>
<b>Sent:</b> Monday, March 3, 2025 10:00<br><b>To:</b> Jane<br><b>Subject:</b> Printer</font>
<div>&nbsp;</div></div>
<div>Did the new driver help?</div>
</body></html>"""

GMAIL_REPLY = """<div dir="ltr">It works now, thanks!<div><br></div>
<div>Jane</div></div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">
On Mon, 3 Mar 2025 at 10:00, Support
&lt;<a href="mailto:support@example.com">support@example.com</a>&gt;
wrote:<br></div><blockquote class="gmail_quote" style="margin:0 0 0 .8ex">
<div>Does the new driver help?</div></blockquote></div>"""

APPLE_REPLY = """<html><body><div>Sure, tomorrow works.<br><br><div><br>
<blockquote type="cite">
<div>On 3 Mar 2025, at 10:00, Support &lt;support@example.com&gt; wrote:</div>
<br><div><div>Shall we call?</div></div></blockquote></div><br></div></body></html>"""

THUNDERBIRD_REPLY = """<html><body><p>Top reply.</p>
<div class="moz-cite-prefix">On 03/03/2025 10:00, Support wrote:<br></div>
<blockquote type="cite" cite="mid:1@example.com">Shall we call?</blockquote>
<div class="moz-signature">-- <br>Jane</div></body></html>"""

OUTLOOK_DESKTOP_REPLY = """<html><body><div class="WordSection1">
<p class="MsoNormal">Thanks!<o:p></o:p></p><p class="MsoNormal"><o:p>&nbsp;</o:p></p>
<div><div style="border:none;border-top:solid #E1E1E1 1.0pt">
<p class="MsoNormal"><b>From:</b> Support &lt;support@example.com&gt;<br>
<b>Sent:</b> Monday, March 3, 2025
10:00 AM<br><b>To:</b> Jane<br><b>Subject:</b> Printer<o:p></o:p></p></div></div>
<p class="MsoNormal">Shall we call?<o:p></o:p></p></div></body></html>"""

HTML_REPLIES = [
    ("outlook-web", OUTLOOK_WEB_REPLY, "Yes, please close the ticket."),
    ("gmail", GMAIL_REPLY, "It works now, thanks!\n\nJane"),
    ("apple-mail", APPLE_REPLY, "Sure, tomorrow works."),
    ("thunderbird", THUNDERBIRD_REPLY, "Top reply."),
    ("outlook-desktop", OUTLOOK_DESKTOP_REPLY, "Thanks!"),
]


@pytest.mark.parametrize(
    ("name", "html", "expected"), HTML_REPLIES, ids=[c[0] for c in HTML_REPLIES]
)
def test_html_only_reply(name: str, html: str, expected: str) -> None:
    assert extract_new_text(html_to_text(html)) == expected


def test_outlook_reply_header_becomes_quoted_text() -> None:
    lines = html_to_text(OUTLOOK_WEB_REPLY).split("\n")
    assert lines[0] == "Yes, please close the ticket."
    assert "> From: Support <support@example.com>" in lines
    assert "> Did the new driver help?" in lines


def test_html_forward_keeps_the_forwarders_words() -> None:
    html = (
        "<div>Please look at this one.</div><div><br></div><div>---------- Forwarded message"
        " ---------<br>From: Jane &lt;jane@acme.example&gt;<br>Date: Mon, 3 Mar 2025<br>"
        "Subject: Printer<br></div><div>It is broken.</div>"
    )
    assert extract_new_text(html_to_text(html)) == "Please look at this one."


HOSTILE_HTML = [
    ("unclosed-tags", "<a" * 20000, "<a" * 20000),
    ("unclosed-comments", "x<!--" * 20000, "x"),
    ("processing-instructions", "<?" * 20000, "<?" * 20000),
    ("unbalanced-quotes", "<a b='>" * 20000 + "end", "end"),
    ("deep-nesting", "<div><blockquote>" * 5000 + "deep", "> " * 10 + "deep"),
    ("many-anchors", '<a href="u">x' * 5000, " ".join(["x <u>"] * 5000).replace("> x", ">x")),
]


@pytest.mark.parametrize(
    ("name", "html", "expected"), HOSTILE_HTML, ids=[c[0] for c in HOSTILE_HTML]
)
def test_hostile_html_renders(name: str, html: str, expected: str) -> None:
    """Inputs that make html.parser rescan the document per '<' are defused (see _tidy)."""
    assert html_to_text(html) == expected


def test_every_end_marker_is_in_the_prefilter() -> None:
    """`_ends_new_text` tries its line patterns only where one alternation of them all
    matches: a pattern left out of it would silently never end the new text. The line
    patterns are those the two functions name that start at the line's first non-space."""
    from parsing import quoted

    names = {
        *quoted._ends_new_text.__code__.co_names,
        *quoted._is_mobile_signature.__code__.co_names,
    }
    line_patterns = [
        pattern
        for name in names - {"_MAY_END_NEW_TEXT"}
        if isinstance(pattern := getattr(quoted, name, None), re.Pattern)
        and pattern.pattern.startswith(r"\s*")
    ]
    assert len(line_patterns) == 7
    for pattern in line_patterns:
        assert f"(?:{pattern.pattern})" in quoted._MAY_END_NEW_TEXT.pattern
