"""Row parsers of the sample-building job (:mod:`beam_jobs.prepare`).

Every parser turns ONE raw input line into exactly one of

* a **behavior** ``(user_key, item_key, cate_key, ts, engage, domain)`` — a plain
  6-tuple of ``str, str, str, int, float, int``;
* a :class:`DeadLetter` ``(reason, raw_line)`` — the row is malformed;
* a :class:`Filtered` ``(reason, raw_line)`` — the row is well formed but a rule
  drops it (e.g. a Taobao behavior type that is not kept).

Parsers never raise. A ``reason`` is one line, ``"<kind>: <detail>"`` (or just
``"<kind>"``), e.g. ``"wrong column count: 3 != 5"``; :func:`reason_kind` maps it
to the metric/report key (``"wrong_column_count"``).

Raw keys are normalised: numeric ids lose leading zeros and surrounding blanks
(``" 007"`` -> ``"7"``) so the same id always maps to the same dense id.
Pure Python (no Beam, no TensorFlow), so the parsers are cheap to unit test.
"""
from __future__ import annotations

import csv
import io
import math
import re
from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

# 2100-01-01T00:00:00Z; later timestamps are treated as corrupt.
MAX_TIMESTAMP = 4_102_444_800
MIN_RATING, MAX_RATING = 0.5, 5.0
DEFAULT_DOMAIN = 1  # == tfmodels.schema.DEFAULT_DOMAIN (kept import-free of TensorFlow)

UNKNOWN_CATEGORY = "unknown"       # MovieLens movie absent from movies.csv
NO_GENRES = "(no genres listed)"   # MovieLens's own marker; a category like any other

TAOBAO_BEHAVIORS = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}  # behavior type -> engage code
MOVIELENS_RATINGS_HEADER = "userId,movieId,rating,timestamp"

Behavior = Tuple[str, str, str, int, float, int]


class DeadLetter(NamedTuple):
    """A malformed row: ``(reason, raw_line)``."""
    reason: str
    raw: str


class Filtered(NamedTuple):
    """A well-formed row dropped by a rule: ``(reason, raw_line)``."""
    reason: str
    raw: str


Parsed = Union[Behavior, DeadLetter, Filtered]

_INT_RE = re.compile(r"^[+-]?\d+$")
_ID_RE = re.compile(r"^\d+$")


def reason_kind(reason: str) -> str:
    """``"wrong column count: 3 != 5"`` -> ``"wrong_column_count"`` (metric and report key)."""
    kind = reason.split(":", 1)[0].strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", kind).strip("_") or "unknown"


def decode_line(raw: Union[bytes, str]) -> Tuple[Optional[str], str]:
    """``(text or None, printable)``: UTF-8 text of a raw line, or None if it is not UTF-8.

    A trailing ``\\r`` (CRLF files) is removed.
    """
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, raw.decode("utf-8", errors="replace").rstrip("\r\n")
    text = text.rstrip("\r\n")
    return text, text


# ----------------------------------------------------------------------------- fields


def _parse_id(value: str, what: str) -> Tuple[Optional[str], Optional[str]]:
    """(normalised id, None) or (None, reason)."""
    v = value.strip()
    if not _ID_RE.match(v):
        return None, f"non-numeric id: {what}={value!r}"
    return str(int(v)), None


def parse_timestamp(value: str) -> Tuple[Optional[int], Optional[str]]:
    """Unix seconds in ``[0, MAX_TIMESTAMP]``: (ts, None) or (None, reason)."""
    v = value.strip()
    if not _INT_RE.match(v):
        return None, f"bad timestamp: not an integer {value!r}"
    ts = int(v)
    if ts < 0:
        return None, f"bad timestamp: negative {ts}"
    if ts > MAX_TIMESTAMP:
        return None, f"bad timestamp: after year 2100 {ts}"
    return ts, None


def _split_columns(line: str, expected: int) -> Tuple[Optional[list], Optional[str]]:
    if not line.strip():
        return None, "blank line"
    cols = line.split(",")
    if len(cols) != expected:
        return None, f"wrong column count: {len(cols)} != {expected}"
    return cols, None


# ----------------------------------------------------------------------------- MovieLens


def first_genre(genres: str) -> str:
    """Category of a movie: its first genre (``"(no genres listed)"`` is kept as is)."""
    g = genres.strip().split("|", 1)[0].strip()
    return g if g else UNKNOWN_CATEGORY


def parse_movies_csv(text: str) -> Tuple[Dict[str, str], int]:
    """``movies.csv`` content -> (``{movieId: first genre}``, number of malformed rows).

    Parsed with the csv module (titles hold quoted commas). The header is
    skipped; the first row of a duplicated movieId wins.
    """
    genres: Dict[str, str] = {}
    malformed = 0
    reader = csv.reader(io.StringIO(text))
    for i, row in enumerate(reader):
        if i == 0 and row and row[0].strip().lstrip("\ufeff") == "movieId":
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 3:
            malformed += 1
            continue
        movie, err = _parse_id(row[0], "movieId")
        if err:
            malformed += 1
            continue
        genres.setdefault(movie, first_genre(row[2]))
    return genres, malformed


def parse_movielens_rating(line: Union[bytes, str], genres: Mapping[str, str]) -> Parsed:
    """One ``ratings.csv`` line (``userId,movieId,rating,timestamp``) -> behavior or dead letter.

    ``engage`` = the rating; the category = the movie's first genre from
    ``genres`` (:func:`parse_movies_csv`), ``"unknown"`` for a movie missing there.
    The header line must be skipped by the reader.
    """
    text, printable = decode_line(line)
    if text is None:
        return DeadLetter("bad encoding: not UTF-8", printable)
    cols, err = _split_columns(text, 4)
    if err:
        return DeadLetter(err, printable)
    user, err = _parse_id(cols[0], "userId")
    if err:
        return DeadLetter(err, printable)
    movie, err = _parse_id(cols[1], "movieId")
    if err:
        return DeadLetter(err, printable)
    try:
        rating = float(cols[2])
    except ValueError:
        return DeadLetter(f"bad rating: not a number {cols[2]!r}", printable)
    if not math.isfinite(rating) or not MIN_RATING <= rating <= MAX_RATING:
        return DeadLetter(f"bad rating: outside [{MIN_RATING}, {MAX_RATING}] {cols[2].strip()}",
                          printable)
    ts, err = parse_timestamp(cols[3])
    if err:
        return DeadLetter(err, printable)
    cate = genres.get(movie, UNKNOWN_CATEGORY)
    return (user, movie, cate, ts, rating, DEFAULT_DOMAIN)


# ----------------------------------------------------------------------------- Taobao


def parse_keep_behaviors(spec: str) -> frozenset:
    """``"pv,buy"`` -> ``frozenset({"pv", "buy"})``; raises ValueError on unknown names."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(TAOBAO_BEHAVIORS))
    if unknown or not names:
        raise ValueError(f"--taobao_keep_behaviors {spec!r}: expected a comma-separated subset "
                         f"of {sorted(TAOBAO_BEHAVIORS)}")
    return frozenset(names)


def parse_taobao_line(line: Union[bytes, str],
                      keep: Iterable[str] = tuple(TAOBAO_BEHAVIORS)) -> Parsed:
    """One ``UserBehavior.csv`` line (``user_id,item_id,category_id,behavior_type,timestamp``).

    ``engage`` = behavior code pv=1, cart=2, fav=3, buy=4. An unknown behavior
    type is a dead letter; a known type not in ``keep`` is :class:`Filtered`.
    """
    text, printable = decode_line(line)
    if text is None:
        return DeadLetter("bad encoding: not UTF-8", printable)
    cols, err = _split_columns(text, 5)
    if err:
        return DeadLetter(err, printable)
    user, err = _parse_id(cols[0], "user_id")
    if err:
        return DeadLetter(err, printable)
    item, err = _parse_id(cols[1], "item_id")
    if err:
        return DeadLetter(err, printable)
    cate, err = _parse_id(cols[2], "category_id")
    if err:
        return DeadLetter(err, printable)
    btype = cols[3].strip().lower()
    if btype not in TAOBAO_BEHAVIORS:
        return DeadLetter(f"unknown behavior type: {cols[3]!r}", printable)
    ts, err = parse_timestamp(cols[4])
    if err:
        return DeadLetter(err, printable)
    if btype not in keep:
        return Filtered(f"behavior type not kept: {btype}", printable)
    return (user, item, cate, ts, float(TAOBAO_BEHAVIORS[btype]), DEFAULT_DOMAIN)


# ----------------------------------------------------------------------------- synthetic


def check_synthetic_event(user_key: str, event) -> Optional[str]:
    """None if a generator event ``(item_key, cate_key, ts, engage, domain)`` is usable, else a reason."""
    try:
        item, cate, ts, engage, domain = event
    except (TypeError, ValueError):
        return "wrong column count: event is not a 5-tuple"
    return _check_generated(user_key, item, cate, ts, engage, domain)


def check_synthetic_impression(user_key: str, imp) -> Optional[str]:
    """None if a generator impression ``(item_key, cate_key, ts, label)`` is usable, else a reason."""
    try:
        item, cate, ts, label = imp
    except (TypeError, ValueError):
        return "wrong column count: impression is not a 4-tuple"
    if not isinstance(label, (int, float)) or not math.isfinite(float(label)):
        return f"bad label: {label!r}"
    return _check_generated(user_key, item, cate, ts, 0.0, DEFAULT_DOMAIN)


def _check_generated(user_key, item, cate, ts, engage, domain) -> Optional[str]:
    for what, key in (("user_key", user_key), ("item_key", item), ("cate_key", cate)):
        if not isinstance(key, str) or not key:
            return f"bad key: {what}={key!r}"
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"bad timestamp: not an integer {ts!r}"
    if not 0 <= ts <= MAX_TIMESTAMP:
        return f"bad timestamp: outside [0, {MAX_TIMESTAMP}] {ts}"
    if not isinstance(engage, (int, float)) or not math.isfinite(float(engage)):
        return f"bad engage: {engage!r}"
    if isinstance(domain, bool) or not isinstance(domain, int) or domain < 1:
        return f"bad domain: {domain!r} (domains start at 1; 0 is padding)"
    return None
