"""Report text: section extraction and the sentence cleaning used for pre-training.

Section extraction follows the rules of the MIMIC-CXR section splitter:

* A header is a line that starts (after optional spaces) with a name and a colon, e.g.
  ``FINDINGS:``, `` IMPRESSION:``, ``FINDINGS AND IMPRESSION:``. A name in capitals
  (letters, spaces, ``( ) / , & -``) always counts; a name in other case counts only when it
  is a known section name (``Findings:``, ``Impression:``...), so ordinary sentences that
  contain a colon never open a section.
* Names are normalised: synonyms (``CONCLUSION`` -> impression, ``FINDINGS/IMPRESSION`` ->
  impression, ``CHEST, TWO VIEWS`` -> findings, ...) and single-word misspellings of
  "findings" and "impression" (``IMPRESSON``, ``FINDNGS``) map to the canonical name.
* When a section name occurs more than once, the last non-empty one wins (addenda repeat
  the impression).
* When a report has neither findings nor impression, its last paragraph (split at blank
  lines) of its last section stands in, as the official code does. A report without any
  header uses its last paragraph, which for a one-paragraph report is the whole text.

``sections`` chooses the text:

* ``impression``: the impression; else the findings; else the last paragraph.
* ``findings``: the findings; else the impression; else the last paragraph.
* ``both`` (default): impression then findings (MGCA's order, which keeps the summary
  inside a 112-token window), each once; else the last paragraph.

Cleaning (``clean_report``) reproduces MGCA's pre-processing of MIMIC-CXR reports:
line breaks become spaces; the text is split at list markers (``1.``, ``2.``) and at every
full stop; each piece is lower-cased and reduced to its runs of word characters
(``[A-Za-z0-9_]``), non-ASCII characters removed; pieces with fewer than two tokens are
dropped ("clear", "___"); the kept pieces are joined by single spaces. A report left with
fewer than three tokens is unusable and comes back as "". One deliberate difference:
de-identification placeholders (``___`` in MIMIC, ``XXXX`` in IU X-ray) are dropped as
tokens, since they carry no meaning and MGCA only kept them by accident.
"""
from __future__ import annotations

import difflib
import re
import unicodedata

from core.errors import InputError

SECTION_CHOICES = ("impression", "findings", "both")
MIN_SENTENCE_TOKENS = 2
MIN_REPORT_TOKENS = 3

# Canonical names for the header variants seen in chest X-ray reports.
SYNONYMS = {
    "impression": "impression", "impressions": "impression", "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression", "findings/impression": "impression",
    "impression and findings": "impression", "impression/findings": "impression",
    "findings / impression": "impression", "findings, impression": "impression",
    "findings": "findings", "finding": "findings", "chest, two views": "findings",
    "chest two views": "findings", "pa and lateral views of the chest": "findings",
    "reference findings": "findings",
    "comparison": "comparison", "comparisons": "comparison", "comparison exam": "comparison",
    "comparison film": "comparison", "reference exam": "comparison",
    "indication": "indication", "indications": "indication", "reason for examination": "indication",
    "reason for exam": "indication", "clinical indication": "indication",
    "history": "history", "clinical history": "history", "clinical information": "history",
    "patient history": "history",
    "technique": "technique", "examination": "examination", "exam": "examination",
    "type of examination": "examination", "recommendation": "recommendations",
    "recommendations": "recommendations", "recommendation(s)": "recommendations",
    "notification": "notification", "addendum": "addendum", "wet read": "wet read",
    "wetread": "wet read", "comment": "comment", "comments": "comment",
}
_TYPO_TARGETS = ("findings", "impression")

_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/,&-]{0,48}?)[ \t]*:", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_LIST_MARKER = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")
_PLACEHOLDER = re.compile(r"_+|x{3,}")


def normalise_section_name(name: str) -> str:
    """The canonical name of a header ("IMPRESSON" -> "impression"), else the lower-cased name."""
    key = " ".join(name.lower().split())
    if key in SYNONYMS:
        return SYNONYMS[key]
    if " " not in key and len(key) >= 6:
        close = difflib.get_close_matches(key, _TYPO_TARGETS, n=1, cutoff=0.8)
        if close:
            return close[0]
    return key


def _is_header(name: str) -> bool:
    letters = [c for c in name if c.isalpha()]
    if not letters:
        return False
    if all(c.isupper() for c in letters):
        return True
    return " ".join(name.lower().split()) in SYNONYMS


def split_sections(text: str) -> list[tuple[str, str]]:
    """(normalised name, body) in order; text before the first header is "preamble".

    A report without any header is one section named "full report".
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    headers = [m for m in _HEADER.finditer(text) if _is_header(m.group(1))]
    if not headers:
        return [("full report", text)]
    out = [("preamble", text[: headers[0].start()])]
    for m, nxt in zip(headers, [*headers[1:], None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        out.append((normalise_section_name(m.group(1)), body))
    return out


def last_paragraph(text: str) -> str:
    parts = [p for p in _PARAGRAPH.split(text) if p.strip()]
    return parts[-1].strip() if parts else ""


def extract_sections(text: str) -> dict[str, str]:
    """The findings and impression (last non-empty of each), and the last-paragraph fallback.

    Keys present only when non-empty: "findings", "impression", "last_paragraph".
    """
    sections = split_sections(text)
    out: dict[str, str] = {}
    for name, body in sections:
        if name in ("findings", "impression") and body.strip():
            out[name] = body.strip()
    if not out:
        name, body = sections[-1]
        if name == "full report" or len([p for p in _PARAGRAPH.split(body) if p.strip()]) > 1:
            fallback = last_paragraph(body)
            if fallback:
                out["last_paragraph"] = fallback
    return out


def select_text(text: str, sections: str = "both") -> str:
    """The raw text of the chosen sections (see the module docstring); "" when none."""
    if sections not in SECTION_CHOICES:
        raise InputError(f"sections must be one of {', '.join(SECTION_CHOICES)}, not {sections!r}")
    return choose_sections(extract_sections(text), sections)


def choose_sections(found: dict[str, str], sections: str = "both") -> str:
    """Join the chosen entries of ``{"findings", "impression", "last_paragraph"}`` (see above)."""
    found = {k: v.strip() for k, v in found.items() if v and v.strip()}
    if sections == "both":
        order = ("impression", "findings")
    elif sections == "impression":
        order = ("impression",) if "impression" in found else ("findings",)
    else:
        order = ("findings",) if "findings" in found else ("impression",)
    parts = [found[k] for k in order if k in found]
    if not parts and "last_paragraph" in found:
        parts = [found["last_paragraph"]]
    # A part that does not end a sentence would run into the next one.
    return "\n".join(p if p[-1] in ".!?" else p + "." for p in parts)


def report_sentences(text: str) -> list[str]:
    """MGCA-style cleaned sentences of a text (see the module docstring)."""
    text = (text or "").replace("\n", " ").replace("\ufffd", " ")
    pieces = [s for chunk in _LIST_MARKER.split(text) for s in chunk.split(".")]
    out = []
    for piece in pieces:
        ascii_piece = unicodedata.normalize("NFKD", piece.lower()).encode("ascii", "ignore").decode("ascii")
        tokens = [t for t in _WORD.findall(ascii_piece) if not _PLACEHOLDER.fullmatch(t)]
        if len(tokens) >= MIN_SENTENCE_TOKENS:
            out.append(" ".join(tokens))
    return out


def clean_report(text: str) -> str:
    """Cleaned sentences joined by spaces; "" when fewer than three tokens remain."""
    sentences = report_sentences(text)
    if sum(len(s.split()) for s in sentences) < MIN_REPORT_TOKENS:
        return ""
    return " ".join(sentences)


def report_text(raw: str, sections: str = "both", clean: bool = True) -> str:
    """The text a reader puts in ``Item.report``; "" means the study has no usable text."""
    chosen = select_text(raw, sections)
    if clean:
        return clean_report(chosen)
    return " ".join(chosen.split())
