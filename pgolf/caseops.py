"""CaseOps: a lossless case transform, so that "The", "THE" and "the" share the pieces of "the".

`encode(text)` lowercases every word and writes its capitalization as marker characters in front of
it; `decode(encode(text)) == text` for every string. Markers are four private-use code points, which
the tokenizer reserves as user-defined pieces (CASEOPS_MARKERS):

    TITLE   U+E010  the next word is Titlecase          "The"   -> TITLE "the"
    ALLCAPS U+E011  the next word is all capitals       "NASA"  -> ALLCAPS "nasa"
    CAPNEXT U+E012  the next letter is a capital        "iPhone" -> "i" CAPNEXT "phone"
    ESC     U+E013  the next character is literal       U+E010 in the input -> ESC U+E010

Letters. Only letters with a one-to-one case pair are transformed: a code point U whose lowercase is
one code point L with L.upper() == U (and the reverse). Per code point, never per string, so Greek
final sigma, Turkish dotless i / dotted I, the Kelvin sign, ß, titlecase digraphs (ǅ) and any other
letter whose case mapping is not a bijection pass through unchanged and are simply not letters here.
A *word* is a maximal run of such letters; everything else (digits, marks, ß, unpaired letters,
punctuation) ends a word. Mixed-case words mark each capital with CAPNEXT.

Markers go before the space. When a word that starts with a marker follows a single space, the marker
moves in front of that space: " The" -> TITLE " the", not " " TITLE "the". SentencePiece starts a piece
at every space, so the word keeps its "▁the" piece and the marker costs one token, not two (a marker
between "▁" and "the" would leave the "▁" as a piece of its own). That is the change from version 1.

Private-use input. Only the four marker code points are escaped (ESC + the character); every other
character, private-use ones included, passes through unchanged. decode rejects text that encode cannot
produce (a marker not followed by what it needs, a capital that is a paired letter, a word marker
inside a word) with CaseOpsError, so a corrupted token stream is caught rather than guessed at.

The letter classes come from Python's Unicode database (`unicodedata.unidata_version`, recorded as
`unicode` in a dataset's manifest next to TRANSFORM_NAME and TRANSFORM_VERSION).

Bytes. `original_byte_lengths(text')` (sparse form: `length_changes`) gives, per character of the
transformed text, the UTF-8 bytes of the original text it stands for: markers (ESC included) stand for 0 bytes, a lowered letter for its
capital's bytes, everything else for itself. These sum to len(decode(text').encode()) and are what
the per-token byte sidecar is made of (pgolf.sidecar).
"""
from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache

TRANSFORM_NAME = "caseops"
TRANSFORM_VERSION = 2
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue010", "\ue011", "\ue012", "\ue013"
CASEOPS_MARKERS = (TITLE, ALLCAPS, CAPNEXT, ESC)


class CaseOpsError(ValueError):
    pass


def describe() -> dict:
    """What a dataset's manifest records about the transform."""
    return {"name": TRANSFORM_NAME, "version": TRANSFORM_VERSION, "markers": [f"U+{ord(m):04X}" for m in CASEOPS_MARKERS],
            "unicode": unicodedata.unidata_version}


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, str], dict[str, str], re.Pattern, re.Pattern, re.Pattern]:
    """(upper->lower, lower->upper, word regex, paired-capital regex, decode regex), built on first use."""
    to_lower: dict[str, str] = {}
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        u = chr(cp)
        lo = u.lower()
        if len(lo) == 1 and lo != u and u.upper() == u and lo.upper() == u and lo.lower() == lo:
            to_lower[u] = lo
    to_upper = {lo: u for u, lo in to_lower.items()}
    assert len(to_upper) == len(to_lower)  # one-to-one by construction

    def char_class(chars) -> str:
        return "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"

    letters = char_class([*to_lower, *to_upper])
    lowers = char_class(to_upper)
    word = re.compile(f"( ?)({letters}+)|[{''.join(CASEOPS_MARKERS)}]")
    capital = re.compile(char_class(to_lower))
    case = re.escape(TITLE + ALLCAPS + CAPNEXT)
    decoder = re.compile(f"{re.escape(ESC)}(.?)|([{case}])( ?)({lowers}*)", re.S)
    return to_lower, to_upper, word, capital, decoder


def _encode_word(match: re.Match) -> str:
    if match.group(2) is None:
        return ESC + match.group()
    space, word = match.groups()
    to_lower = _tables()[0]
    upper = [c in to_lower for c in word]
    if not any(upper):
        return space + word
    lowered = "".join(to_lower.get(c, c) for c in word)
    if upper[0] and not any(upper[1:]):
        return TITLE + space + lowered
    if all(upper):
        return ALLCAPS + space + lowered
    marked = "".join(CAPNEXT + lo if up else lo for lo, up in zip(lowered, upper))
    return marked[0] + space + marked[1:] if upper[0] else space + marked


def encode(text: str) -> str:
    """Lowercase every word, with its capitalization as markers; escape literal marker characters."""
    return _tables()[2].sub(_encode_word, text)


def _fail(text: str, pos: int, what: str) -> CaseOpsError:
    return CaseOpsError(f"malformed CaseOps text at character {pos} ({text[max(0, pos - 10):pos + 10]!r}): {what}")


def decode(text: str) -> str:
    """The inverse of encode; CaseOpsError for text that encode cannot produce."""
    return "".join(_decode_parts(text)[0])


def _decode_parts(text: str) -> tuple[list[str], list[tuple[int, int, str]]]:
    """Decoded pieces, and per marker match (start, end, replacement) for the byte accounting."""
    _, to_upper, _, capital, decoder = _tables()
    bad = capital.search(text)
    if bad:
        raise _fail(text, bad.start(), f"capital {bad.group()!r} without a marker (encode lowers it)")
    parts, matches, pos = [], [], 0
    for m in decoder.finditer(text):
        start, end = m.span()
        esc, marker, space, body = m.groups()
        if esc is not None:
            if esc not in CASEOPS_MARKERS:
                raise _fail(text, start, "ESC must be followed by a marker character")
            out = esc
        else:
            if not body:
                raise _fail(text, start, "a case marker must be followed by a lowercase letter")
            if marker != CAPNEXT and not space and start > 0 and text[start - 1] in to_upper:
                raise _fail(text, start, "a word marker inside a word")
            if marker == ALLCAPS:
                if len(body) < 2 or text[end:end + 2].startswith(CAPNEXT) and text[end + 1:end + 2] != " ":
                    raise _fail(text, start, "ALLCAPS must cover a whole word of two or more letters")
                out = space + "".join(to_upper[c] for c in body)
            else:
                out = space + to_upper[body[0]] + body[1:]
        parts.append(text[pos:start])
        parts.append(out)
        matches.append((start, end, out))
        pos = end
    parts.append(text[pos:])
    return parts, matches


def length_changes(text: str) -> list[tuple[int, int]]:
    """(character index, original UTF-8 bytes) for each character of transformed `text` that stands for
    another number of bytes than its own: every marker (0), and a lowered letter whose capital is longer
    or shorter in UTF-8. Every other character stands for itself."""
    changes = []
    for start, _, out in _decode_parts(text)[1]:
        changes.append((start, 0))
        for k, c in enumerate(out):
            n = len(c.encode("utf-8"))
            if n != len(text[start + 1 + k].encode("utf-8")):
                changes.append((start + 1 + k, n))
    return changes


def original_byte_lengths(text: str) -> list[int]:
    """Per character of transformed `text`, the UTF-8 bytes of the original text it stands for."""
    lengths = [len(c.encode("utf-8")) for c in text]
    for index, n in length_changes(text):
        lengths[index] = n
    return lengths
