"""Token text for people: byte-level BPE tokens -> the characters they make.

SmolVLM's tokenizer (SmolLM2, GPT-2 style) is a byte-level BPE: each token string spells UTF-8 bytes
in the GPT-2 byte alphabet (``Ġ`` = space, ``Ċ`` = newline, ``ì`` = 0xEC, ...). A Korean syllable,
a kana, an emoji or an accented letter often spans several tokens, so decoding tokens one by one
shows "�". :func:`units` groups consecutive tokens into the smallest runs that decode to whole
characters; this is the one place that does it (the viewer's token table and page, and
compute_token_heatmap.py's messages and ``--token`` matching all use it).
"""
from __future__ import annotations

import re
from typing import NamedTuple
from functools import lru_cache

SPECIAL = re.compile(r"^(<\|[^|>]+\|>|<end_of_utterance>|<fake_token_around_image>|<global-img>|<image>"
                     r"|<row_\d+_col_\d+>)$")
MAX_UNIT = 16   # tokens in one unit at most (a UTF-8 character is <= 4 bytes; chains stay short)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    """The GPT-2 byte alphabet (character -> byte), as the tokenizer's ByteLevel decoder uses it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@lru_cache(maxsize=1 << 16)
def token_bytes(raw: str) -> bytes | None:
    """The bytes a byte-level token spells; None for special tokens and tokens that are already
    readable text (e.g. the reference project's unicode token files)."""
    if SPECIAL.match(raw):
        return None
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in raw)
    except KeyError:
        return None


@lru_cache(maxsize=1 << 16)
def display_token(raw: str) -> str:
    """One token on its own: Ġ -> space, Ċ -> newline, special tokens untouched. Bytes of a character
    that continues in a neighbouring token show as "�" (use :func:`units` for whole characters)."""
    b = token_bytes(raw)
    if b is not None:
        return b.decode("utf-8", errors="replace")
    if SPECIAL.match(raw):
        return raw
    return raw.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")


def piece(raw: str) -> str:
    """One token's own part of a unit, for a split view: whole characters as text, bytes of a split
    character as ``\\xNN``."""
    b = token_bytes(raw)
    return display_token(raw) if b is None else b.decode("utf-8", errors="backslashreplace")


class Unit(NamedTuple):
    """Tokens ``start``..``stop - 1`` together spell ``text`` (whole characters). (A NamedTuple: a
    64-frame video's 5,000 tokens are made into units on every run open.)"""
    start: int
    stop: int
    text: str


def _complete(data: bytes) -> bool | None:
    """True: whole characters; False: valid so far but ends inside a character; None: invalid UTF-8."""
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as e:   # the first error is the truncation at the end: all before is valid
        return False if e.reason == "unexpected end of data" and e.end == len(data) else None


def units(tokens) -> list[Unit]:
    """Group consecutive tokens into the smallest runs that decode to whole UTF-8 characters.

    A token that is whole on its own is its own unit. A token that ends inside a character is joined
    with the following byte-level tokens until the bytes are whole (at most MAX_UNIT tokens); if they
    never become whole (invalid bytes, a special token or the end in between) the token stays alone
    and shows "�". Special tokens and readable-text tokens are always alone.
    """
    tokens = list(tokens)
    data = [token_bytes(t) for t in tokens]
    out, i, n = [], 0, len(tokens)
    while i < n:
        if data[i] is None:
            out.append(Unit(i, i + 1, display_token(tokens[i])))
            i += 1
            continue
        acc, j, done = data[i], i, _complete(data[i])
        while done is False and j + 1 < n and data[j + 1] is not None and j + 1 - i < MAX_UNIT:
            j += 1
            acc += data[j]
            done = _complete(acc)
        if done:
            out.append(Unit(i, j + 1, acc.decode("utf-8")))
            i = j + 1
        else:
            out.append(Unit(i, i + 1, display_token(tokens[i])))
            i += 1
    return out


def unit_of(unit_list) -> dict:
    """position -> its Unit."""
    return {p: u for u in unit_list for p in range(u.start, u.stop)}


def text_at(tokens, first: int, last: int | None = None) -> str:
    """The whole characters spelt by the units that tokens ``first``..``last`` (default: just
    ``first``) are part of."""
    last = first if last is None else last
    start = first   # units restart after any token that is not byte-level: group from the nearest one
    while start > 0 and token_bytes(tokens[start - 1]) is not None:
        start -= 1
    near = units(tokens[start:last + MAX_UNIT])
    return "".join(u.text for u in near if u.start + start <= last and u.stop + start > first)


def search(unit_list, text: str, positions=None, exact: bool = True) -> list[tuple[int, int]]:
    """Token spans (first, last position) matching ``text`` (case-insensitive, surrounding spaces
    ignored), in sequence order. ``exact``: units whose stripped text equals ``text``; otherwise
    occurrences inside the decoded text of consecutive units (never across a special token).
    ``positions``: only units starting at these positions count."""
    want = text.strip().lower()
    if not want:
        return []
    allowed = None if positions is None else set(positions)
    pool = [u for u in unit_list if allowed is None or u.start in allowed]
    if exact:
        return [(u.start, u.stop - 1) for u in pool if u.text.strip().lower() == want]
    found, segment = [], []

    def scan():
        joined, owner = "", []
        for u in segment:
            joined += u.text.lower()
            owner += [u] * len(u.text.lower())
        at = joined.find(want)
        while at >= 0:
            found.append((owner[at].start, owner[at + len(want) - 1].stop - 1))
            at = joined.find(want, at + 1)
    for u in pool:
        if SPECIAL.match(u.text) or (segment and segment[-1].stop != u.start):
            scan()
            segment = []
        if not SPECIAL.match(u.text):
            segment.append(u)
    scan()
    return found
