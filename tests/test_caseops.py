"""CaseOps: exact encodings, the round trip on adversarial and random strings, byte lengths, malformed input."""
from __future__ import annotations

import random

import pytest

from pgolf import caseops
from pgolf.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode, original_byte_lengths

EXACT = [
    ("", ""),
    ("the cat", "the cat"),
    # a word marker moves in front of the single space before its word (one piece boundary, not two)
    ("The NASA iPhone", f"{TITLE}the{ALLCAPS} nasa i{CAPNEXT}phone"),
    ("I A", f"{TITLE}i{TITLE} a"),
    ("McDonald McD", f"{CAPNEXT}mc{CAPNEXT}donald{CAPNEXT} mc{CAPNEXT}d"),
    ("ÀB Ωmega", f"{ALLCAPS}àb{TITLE} ωmega"),
    ("a  The,(The", f"a {TITLE} the,({TITLE}the"),
    ("HP DesignJet", f"{ALLCAPS}hp{CAPNEXT} design{CAPNEXT}jet"),  # the next word's marker follows ALLCAPS
    # ß has no one-letter capital: it ends the word, so STRA and E are separate words
    ("STRAßE", f"{ALLCAPS}straß{TITLE}e"),
    # Turkish İ (lower is 2 code points), dotless ı (upper I lowers to i), Kelvin sign: not letters here
    ("İi Iı \u212a", f"İi{TITLE} iı \u212a"),
    # per code point, not str.lower(): final sigma stays σ inside the marker word
    ("ΟΔΟΣ", f"{ALLCAPS}οδοσ"),
    ("\u01c5x", "\u01c5x"),  # titlecase digraph ǅ: no one-to-one pair
    (f"{TITLE}{ESC}\ue000", f"{ESC}{TITLE}{ESC}{ESC}\ue000"),  # markers escaped, other private use kept
]

ADVERSARIAL = [
    "", " ", "\n\n", "A", "a", "AB", "Ab", "aB", "ABc", "HELLO WORLD", "Hello World", "hello", "x" * 1000,
    "Ärger ÜBER Öl", "Москва МОСКВА москва", "Αθήνα ΑΘΉΝΑ", "東京 Tokyo ТОКИО", "ǄǅǆDžLJ", "ﬀ ﬁ ß ẞ SS",
    "E\u0301COLE école ÉCOLE", "A\u0300\u0301B", "\u0301A", "İSTANBUL istanbul Istanbul ı I i",
    "\ue000\ue001\ue010\ue011\ue012\ue013\uf8ff", f"{ESC}", f"{TITLE}", f"A{ESC}B{TITLE}c",
    "\U000f0000\U0010fffd", "𝐀𝐁 𝔄 🙂 ZWJ👩‍💻", "Ⅸ ⅸ ⓐⒶ", "\x00\x7f\u200b\ufeff", "\ud7ff\ue000",
    "a\u0345Α\u0345", "ꞵꞴ Ꟶꟶ 𐐀𐐨",
]


@pytest.mark.parametrize("text,want", EXACT)
def test_exact_encoding(text, want):
    assert encode(text) == want
    assert decode(want) == text


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_adversarial(text):
    e = encode(text)
    assert decode(e) == text
    assert sum(original_byte_lengths(e)) == len(text.encode("utf-8"))
    assert encode(decode(e)) == e


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abcXYZ ", "AB Cd", "ÀàΣσςßİıǅ", "\ue010\ue011\ue012\ue013\ue000", "\u0301\u0308", "日本 ", "\U0001f600\U0010fffd"]
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)])))
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


def test_round_trip_random():
    rng = random.Random(1234)
    for _ in range(3000):
        text = _random_text(rng, rng.randrange(0, 40))
        e = encode(text)
        assert decode(e) == text, repr(text)
        assert sum(original_byte_lengths(e)) == len(text.encode("utf-8")), repr(text)


def test_every_case_pair_round_trips_and_changes_length_correctly():
    to_lower = caseops._tables()[0]
    assert len(to_lower) > 1000 and to_lower["A"] == "a" and "\u0130" not in to_lower and "\u212a" not in to_lower
    text = " ".join(to_lower)
    e = encode(text)
    assert decode(e) == text and sum(original_byte_lengths(e)) == len(text.encode())
    # U+023F ȿ (2 bytes) has the capital U+2C7E (3 bytes): the lowered letter stands for 3 original bytes
    assert original_byte_lengths(encode("\u2c7e")) == [0, 3]


def test_byte_lengths_per_character():
    assert original_byte_lengths(encode("Ab")) == [0, 1, 1]
    assert original_byte_lengths(encode("ÀB")) == [0, 2, 1]
    assert original_byte_lengths(encode(f"x{TITLE}")) == [1, 0, 3]
    assert original_byte_lengths(encode("a B")) == [1, 0, 1, 1]


@pytest.mark.parametrize("bad", [
    TITLE, ALLCAPS, CAPNEXT, ESC, f"{TITLE}1", f"{ESC}a", "The", f"a{TITLE}b", f"{ALLCAPS}a",
    f"{ALLCAPS}ab{CAPNEXT}c", f"{TITLE}{TITLE}a", f"{TITLE} ", f"{TITLE}  a", f"{ESC} ",
])
def test_malformed_text_is_rejected(bad):
    with pytest.raises(CaseOpsError, match="malformed CaseOps text at character"):
        decode(bad)
