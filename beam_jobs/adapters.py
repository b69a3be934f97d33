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

Valid time windows
------------------
Every source declares the time range its rows can come from
(:func:`default_time_window`); a parser given a :class:`TimeWindow` dead-letters a
row whose timestamp lies outside it (``timestamp before valid window: ...`` /
``timestamp after valid window: ...``). This catches rows that parse but cannot be
right, e.g. the 2017-09-11 row and the line cut inside its timestamp (read as
1970) at the head of the real Taobao ``UserBehavior.csv``, which would otherwise
become a user's oldest behaviors. Defaults (inclusive bounds):

* ``taobao``: the dataset's documented range 2017-11-25 00:00:00 to 2017-12-03
  23:59:59 in UTC+8 (China Standard Time, the timezone of the Tianchi release),
  i.e. unix ``[1511539200, 1512316799]``;
* ``taobao_ad``: 2017-04-22 00:00:00 to 2017-05-13 23:59:59 UTC+8, the 22 days of
  ``behavior_log`` ending with the last ``raw_sample`` day (both files) [interp];
* ``movielens``: 1995-01-01 00:00:00 UTC (MovieLens started rating in 1995) to
  the time ``prepare`` runs + 1 day;
* ``synthetic``: the generator's own range, from ``start_ts`` to the latest time
  its config can produce (:func:`synthetic_time_window`).

``prepare --valid_time_window START,END`` replaces the default (``none`` keeps
only the sanity bounds ``[0, MAX_TIMESTAMP]``); see :func:`parse_time_window`.
"""
from __future__ import annotations

import csv
import io
import math
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

# 2100-01-01T00:00:00Z; later timestamps are treated as corrupt.
MAX_TIMESTAMP = 4_102_444_800
MIN_RATING, MAX_RATING = 0.5, 5.0
DEFAULT_DOMAIN = 1  # == tfmodels.schema.DEFAULT_DOMAIN (kept import-free of TensorFlow)
# Two-domain data (METHODS 4.3, LCN): impressions / candidates live in the TARGET domain,
# the lifelong sequence comes from the SOURCE domain. == tfmodels.schema.TARGET_DOMAIN /
# SOURCE_DOMAIN (mirrored import-free, as DEFAULT_DOMAIN). Single-domain data is all domain 1.
TARGET_DOMAIN = 1
SOURCE_DOMAIN = 2

UNKNOWN_CATEGORY = "unknown"       # MovieLens movie absent from movies.csv
NO_GENRES = "(no genres listed)"   # MovieLens's own marker; a category like any other

TAOBAO_BEHAVIORS = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}  # behavior type -> engage code
MOVIELENS_RATINGS_HEADER = "userId,movieId,rating,timestamp"


class MovieLensLayout(NamedTuple):
    """The file layout of a MovieLens release (GroupLens ships three):

    * ``csv``: ``ratings.csv`` (``userId,movieId,rating,timestamp`` with that header) and
      ``movies.csv`` (``movieId,title,genres``): ml-latest(-small), ml-20m, ml-25m, ml-32m;
    * ``dat``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, no header) and
      ``movies.dat`` (``MovieID::Title::Genres``, Latin-1): ml-1m, ml-10m;
    * ``100k``: ``u.data`` (user, item, rating, timestamp, tab separated, no header) and
      ``u.item`` (``|`` separated, 19 genre flags after the fifth field, Latin-1): ml-100k.
    """
    name: str
    ratings: str
    movies: str
    sep: str
    header: Optional[str]    # the ratings file's header line, None when it has none
    releases: str


MOVIELENS_LAYOUTS = (
    MovieLensLayout("csv", "ratings.csv", "movies.csv", ",", MOVIELENS_RATINGS_HEADER,
                    "ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m"),
    MovieLensLayout("dat", "ratings.dat", "movies.dat", "::", None, "ml-1m, ml-10m"),
    MovieLensLayout("100k", "u.data", "u.item", "\t", None, "ml-100k"),
)
# ml-100k's u.genre order (= the flag columns of u.item); alphabetical after "unknown",
# so the first flag set is the first listed genre, as in the other layouts
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                 "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
                 "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
# ml-100k / ml-1m spell it "Children's", ml-10m and the csv releases "Children": one category
GENRE_ALIASES = {"Children's": "Children"}


def movielens_layout(exists) -> Optional[MovieLensLayout]:
    """The first layout of :data:`MOVIELENS_LAYOUTS` whose two files ``exists(name)``."""
    for layout in MOVIELENS_LAYOUTS:
        if exists(layout.ratings) and exists(layout.movies):
            return layout
    return None

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


# ----------------------------------------------------------------------------- time windows

UTC8 = timezone(timedelta(hours=8), "UTC+08:00")
# Taobao UserBehavior (Tianchi 649): "2017-11-25 to 2017-12-03", in China Standard Time.
TAOBAO_TIME_WINDOW_SPEC = "2017-11-25T00:00:00+08:00,2017-12-03T23:59:59+08:00"
MOVIELENS_START = "1995-01-01T00:00:00+00:00"


def iso_utc(ts: int) -> str:
    """Unix seconds -> ``2017-11-24T16:00:00Z``."""
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TimeWindow(NamedTuple):
    """Valid row timestamps: unix seconds ``start <= ts <= end`` (both inclusive)."""
    start: int
    end: int

    def check(self, ts: int) -> Optional[str]:
        """None if ``ts`` is inside, else a dead-letter reason."""
        if ts < self.start:
            return (f"timestamp before valid window: {ts} ({iso_utc(ts)}) < "
                    f"{self.start} ({iso_utc(self.start)})")
        if ts > self.end:
            return (f"timestamp after valid window: {ts} ({iso_utc(ts)}) > "
                    f"{self.end} ({iso_utc(self.end)})")
        return None

    def to_dict(self) -> Dict[str, Any]:
        return {"start": self.start, "end": self.end, "start_utc": iso_utc(self.start),
                "end_utc": iso_utc(self.end), "inclusive": True}


NO_TIME_WINDOW = TimeWindow(0, MAX_TIMESTAMP)
_NOW_RE = re.compile(r"^now(?:([+-])(\d+)d)?$")


def _time_point(text: str, is_end: bool, now: float) -> int:
    """One bound of ``--valid_time_window``: unix seconds, ``now``, ``now+Nd`` /
    ``now-Nd``, or an ISO 8601 date / date-time (``2017-11-25``,
    ``2017-11-25T00:00:00+08:00``; no offset = UTC). A date alone is the first second
    of that day as START and its last second (23:59:59) as END."""
    v = text.strip()
    if _INT_RE.match(v):
        return int(v)
    m = _NOW_RE.match(v.lower())
    if m:
        days = int(m.group(2) or 0) * (1 if m.group(1) != "-" else -1)
        return int(now) + days * 86400
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
    except ValueError:
        raise ValueError(f"{text!r} is not unix seconds, now[+-Nd] or an ISO 8601 date or "
                         f"date-time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    date_only = re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) is not None
    if date_only and is_end:
        dt = dt + timedelta(days=1) - timedelta(seconds=1)
    return int(dt.timestamp())


def parse_time_window(spec: str, now: Optional[float] = None) -> TimeWindow:
    """``"START,END"`` -> :class:`TimeWindow` (bounds inclusive); ``"none"`` ->
    :data:`NO_TIME_WINDOW`. Raises ValueError with a one-line reason."""
    now = time.time() if now is None else now
    if spec.strip().lower() == "none":
        return NO_TIME_WINDOW
    parts = spec.split(",")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"--valid_time_window {spec!r}: expected START,END (or none)")
    try:
        start, end = _time_point(parts[0], False, now), _time_point(parts[1], True, now)
    except ValueError as e:
        raise ValueError(f"--valid_time_window {spec!r}: {e}") from None
    if start > end:
        raise ValueError(f"--valid_time_window {spec!r}: START {iso_utc(start)} is after "
                         f"END {iso_utc(end)}")
    if start < 0 or end > MAX_TIMESTAMP:
        raise ValueError(f"--valid_time_window {spec!r}: bounds must lie in [0, "
                         f"{MAX_TIMESTAMP}] (1970 to 2100)")
    return TimeWindow(start, end)


def synthetic_time_window(config: Mapping[str, Any]) -> TimeWindow:
    """The generator's own range (beam_jobs.synthetic, "Timestamps"): the first event is
    at ``start_ts + [0, start_jitter_s)``; each of the at most ``max_history - 1`` later
    gaps is at most ``break_max_s`` (a session break) or an in-session exponential gap,
    bounded here by ``50 * session_gap_mean_s`` (P = e^-50); the impressions follow within
    3600 + 120 * num_impressions s. [interp] of "synthetic: its own window"."""
    gap = max(float(config["break_max_s"]), 50.0 * float(config["session_gap_mean_s"]))
    end = (int(config["start_ts"]) + int(config["start_jitter_s"])
           + int(config["max_history"]) * math.ceil(gap)
           + 3600 + 120 * int(config["num_impressions"]))
    return TimeWindow(int(config["start_ts"]), min(end, MAX_TIMESTAMP))


def default_time_window(source: str, now: Optional[float] = None,
                        synthetic_config: Optional[Mapping[str, Any]] = None) -> TimeWindow:
    """The declared valid window of a source (module doc, "Valid time windows")."""
    now = time.time() if now is None else now
    if source == "taobao":
        return parse_time_window(TAOBAO_TIME_WINDOW_SPEC, now)
    if source == "taobao_ad":
        return parse_time_window(TAOBAO_AD_TIME_WINDOW_SPEC, now)
    if source == "movielens":
        return parse_time_window(f"{MOVIELENS_START},now+1d", now)
    if source == "synthetic":
        if synthetic_config is None:
            raise ValueError("the synthetic window needs the generator's config")
        return synthetic_time_window(synthetic_config)
    raise ValueError(f"no default time window for source {source!r}")


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


def _split_columns(line: str, expected: int,
                   sep: str = ",") -> Tuple[Optional[list], Optional[str]]:
    if not line.strip():
        return None, "blank line"
    cols = line.split(sep)
    if len(cols) != expected:
        return None, f"wrong column count: {len(cols)} != {expected}"
    return cols, None


# ----------------------------------------------------------------------------- MovieLens


def first_genre(genres: str) -> str:
    """Category of a movie: its first genre (``"(no genres listed)"`` is kept as is;
    ``"Children's"`` of the older releases is ``"Children"``)."""
    g = genres.strip().split("|", 1)[0].strip()
    return GENRE_ALIASES.get(g, g) if g else UNKNOWN_CATEGORY


def parse_movies_dat(text: str) -> Tuple[Dict[str, str], int]:
    """``movies.dat`` (ml-1m / ml-10m: ``MovieID::Title::Genres``) content -> (``{movieId:
    first genre}``, number of malformed rows). The id is the first field and the genres
    the last (a title never holds "::", but this does not rely on it)."""
    genres: Dict[str, str] = {}
    malformed = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("::")
        if len(cols) < 3:
            malformed += 1
            continue
        movie, err = _parse_id(cols[0].lstrip("\ufeff"), "MovieID")
        if err:
            malformed += 1
            continue
        genres.setdefault(movie, first_genre(cols[-1]))
    return genres, malformed


def parse_u_item(text: str) -> Tuple[Dict[str, str], int]:
    """``u.item`` (ml-100k: id|title|release|video release|IMDb URL|19 genre flags)
    content -> (``{movieId: first genre}``, number of malformed rows). The first genre
    is the first flag set in :data:`ML100K_GENRES` order after "unknown"; a movie with
    only "unknown" (or no flag) gets ``"(no genres listed)"``, the csv releases' marker."""
    genres: Dict[str, str] = {}
    malformed = 0
    n = len(ML100K_GENRES)
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split("|")
        flags = [c.strip() for c in cols[-n:]]
        if len(cols) < 5 + n or any(f not in ("0", "1") for f in flags):
            malformed += 1
            continue
        movie, err = _parse_id(cols[0], "movie id")
        if err:
            malformed += 1
            continue
        named = [g for g, f in zip(ML100K_GENRES[1:], flags[1:]) if f == "1"]
        genres.setdefault(movie, GENRE_ALIASES.get(named[0], named[0]) if named else NO_GENRES)
    return genres, malformed


def parse_movies_file(layout: MovieLensLayout, text: str) -> Tuple[Dict[str, str], int]:
    """The movie table of ``layout`` (see :class:`MovieLensLayout`)."""
    return {"csv": parse_movies_csv, "dat": parse_movies_dat,
            "100k": parse_u_item}[layout.name](text)


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


# ``--movielens_domains genre`` (two domains, METHODS 4.3 by analogy) [interp]: a movie's
# domain is decided by its category = its FIRST listed genre (MovieLens lists genres in
# alphabetical order). These first genres form the TARGET domain (impressions); every
# other first genre, "(no genres listed)" and "unknown" (a movie absent from movies.csv)
# form the SOURCE domain. Every movie is in exactly one domain, so items never overlap.
# On ml-latest-small the target holds 30.9 % of the ratings (3,721 of 9,742 movies).
MOVIELENS_TARGET_GENRES = frozenset({"Animation", "Children", "Comedy", "Documentary",
                                     "Musical", "Romance"})
MOVIELENS_DOMAIN_MODES = ("none", "genre")


def movielens_domain(category: str, mode: str = "none") -> int:
    """Domain of a movie of ``category`` (its first genre): always 1 with ``mode="none"``;
    with ``"genre"`` TARGET_DOMAIN iff the genre is in :data:`MOVIELENS_TARGET_GENRES`."""
    if mode == "none":
        return DEFAULT_DOMAIN
    if mode != "genre":
        raise ValueError(f"--movielens_domains {mode!r}: expected one of "
                         f"{', '.join(MOVIELENS_DOMAIN_MODES)}")
    return TARGET_DOMAIN if category in MOVIELENS_TARGET_GENRES else SOURCE_DOMAIN


def parse_movielens_rating(line: Union[bytes, str], genres: Mapping[str, str],
                           window: Optional[TimeWindow] = None,
                           domains: str = "none", sep: str = ",") -> Parsed:
    """One ratings line (``userId,movieId,rating,timestamp``; ``sep`` "::" for
    ``ratings.dat``, a tab for ``u.data``: :data:`MOVIELENS_LAYOUTS`) -> behavior or
    dead letter.

    ``engage`` = the rating; the category = the movie's first genre from
    ``genres`` (:func:`parse_movies_csv`), ``"unknown"`` for a movie missing there.
    A timestamp outside ``window`` (when given) is a dead letter. The domain is
    :func:`movielens_domain` of the category (1 unless ``domains="genre"``).
    The header line must be skipped by the reader.
    """
    text, printable = decode_line(line)
    if text is None:
        return DeadLetter("bad encoding: not UTF-8", printable)
    cols, err = _split_columns(text, 4, sep)
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
    if err is None and window is not None:
        err = window.check(ts)
    if err:
        return DeadLetter(err, printable)
    cate = genres.get(movie, UNKNOWN_CATEGORY)
    return (user, movie, cate, ts, rating, movielens_domain(cate, domains))


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
                      keep: Iterable[str] = tuple(TAOBAO_BEHAVIORS),
                      window: Optional[TimeWindow] = None) -> Parsed:
    """One ``UserBehavior.csv`` line (``user_id,item_id,category_id,behavior_type,timestamp``).

    ``engage`` = behavior code pv=1, cart=2, fav=3, buy=4. An unknown behavior
    type is a dead letter; a known type not in ``keep`` is :class:`Filtered`. A
    timestamp outside ``window`` (when given) is a dead letter (checked before
    ``keep``: a bad row is reported as bad whatever its type).
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
    if err is None and window is not None:
        err = window.check(ts)
    if err:
        return DeadLetter(err, printable)
    if btype not in keep:
        return Filtered(f"behavior type not kept: {btype}", printable)
    return (user, item, cate, ts, float(TAOBAO_BEHAVIORS[btype]), DEFAULT_DOMAIN)


# ----------------------------------------------------------------------------- Taobao ad (Tianchi 56)
#
# METHODS 4.3 (LCN's public set): four CSV files with a header line each, in one folder.
# Domains by category: cate < 2000 -> TARGET (1), >= 2000 -> SOURCE (2). Samples are the
# raw_sample impressions whose ad has cate_id < 2000 (label = clk); impressions of ads
# with cate_id >= 2000 are dropped by the protocol (counted as filtered, not dead
# letters). [interp] behavior_log has no item id: an item is the pair (cate, brand),
# one item key "c{cate}_b{brand}" (brand "NULL" kept as "bNULL"); an impression's item
# is its ad's (cate, brand) key, so candidates and behaviors share one item space
# (adgroup_id, pid, campaign, customer, price have no field in the per-user record and
# are not stored). user_profile.csv is not read: the record has no profile fields.

TAOBAO_AD_RAW_SAMPLE = "raw_sample.csv"
TAOBAO_AD_FEATURE = "ad_feature.csv"
TAOBAO_AD_BEHAVIOR_LOG = "behavior_log.csv"
TAOBAO_AD_USER_PROFILE = "user_profile.csv"
TAOBAO_AD_HEADERS = {
    TAOBAO_AD_RAW_SAMPLE: "user,time_stamp,adgroup_id,pid,nonclk,clk",
    TAOBAO_AD_FEATURE: "adgroup_id,cate_id,campaign_id,customer,brand,price",
    TAOBAO_AD_BEHAVIOR_LOG: "user,time_stamp,btag,cate,brand",
    TAOBAO_AD_USER_PROFILE: ("userid,cms_segid,cms_group_id,final_gender_code,age_level,"
                             "pvalue_level,shopping_level,occupation,new_user_class_level"),
}
TAOBAO_AD_TARGET_CATE_BELOW = 2000   # cate_id < 2000 -> target domain, else source
# [interp] behavior_log spans 22 days ending with the last sample day (2017-04-22 to
# 2017-05-13, UTC+8); raw_sample spans 2017-05-06 to 05-13. One window for both files.
TAOBAO_AD_TIME_WINDOW_SPEC = "2017-04-22T00:00:00+08:00,2017-05-13T23:59:59+08:00"
# Official split [interp of the paper's "first 6 days train, day 7 test"]: 05-06..05-12
# train, 05-13 test; by default the last train day, 05-12, is the validation split.
TAOBAO_AD_VALID_START = "2017-05-12T00:00:00+08:00"
TAOBAO_AD_TEST_START = "2017-05-13T00:00:00+08:00"
TAOBAO_AD_VALID_MODES = ("last_day", "none")


class AdSample(NamedTuple):
    """One raw_sample impression: user, adgroup_id, unix ts, label (= clk)."""
    user: str
    adgroup: str
    ts: int
    label: float


class Ad(NamedTuple):
    """One ad_feature row (the fields used): adgroup_id, cate_id, brand."""
    adgroup: str
    cate: str
    brand: str


def header_matches(line: Union[bytes, str], header: str) -> bool:
    """True if ``line`` is ``header`` (column names compared after stripping blanks, a
    UTF-8 BOM and a trailing CR; the real user_profile.csv header ends with a blank)."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    cols = [c.strip() for c in text.strip().lstrip("\ufeff").split(",")]
    return cols == header.split(",")


def taobao_ad_domain(cate: str) -> int:
    """TARGET_DOMAIN for ``cate_id < 2000``, else SOURCE_DOMAIN (``cate`` normalised)."""
    return TARGET_DOMAIN if int(cate) < TAOBAO_AD_TARGET_CATE_BELOW else SOURCE_DOMAIN


def taobao_ad_item_key(cate: str, brand: str) -> str:
    """The item of a behavior or an ad [interp]: ``"c{cate}_b{brand}"``."""
    return f"c{cate}_b{brand}"


def taobao_ad_cuts(valid: str = "last_day") -> Tuple[int, int]:
    """``(train_end, valid_end)`` unix seconds of the fixed day split: an impression with
    ``ts < train_end`` is train, ``< valid_end`` valid, else test. ``valid="none"``: no
    validation split (train = 05-06..05-12, the official split as is)."""
    if valid not in TAOBAO_AD_VALID_MODES:
        raise ValueError(f"--taobao_ad_valid {valid!r}: expected one of "
                         f"{', '.join(TAOBAO_AD_VALID_MODES)}")
    test = _time_point(TAOBAO_AD_TEST_START, False, 0)
    return (_time_point(TAOBAO_AD_VALID_START, False, 0) if valid == "last_day" else test, test)


def _parse_brand(value: str) -> Tuple[Optional[str], Optional[str]]:
    if value.strip().upper() == "NULL":
        return "NULL", None
    return _parse_id(value, "brand")


def _decode_split(line: Union[bytes, str], n: int):
    """(cols, printable, None) or (None, printable, DeadLetter)."""
    text, printable = decode_line(line)
    if text is None:
        return None, printable, DeadLetter("bad encoding: not UTF-8", printable)
    cols, err = _split_columns(text, n)
    if err:
        return None, printable, DeadLetter(err, printable)
    return cols, printable, None


def parse_taobao_ad_sample(line: Union[bytes, str],
                           window: Optional[TimeWindow] = None) -> Union[AdSample, DeadLetter]:
    """One ``raw_sample.csv`` line (``user,time_stamp,adgroup_id,pid,nonclk,clk``).

    ``pid`` is not used (not checked). ``clk`` and ``nonclk`` must be 0/1 with
    ``nonclk + clk = 1`` (else ``bad label``). The header must be skipped by the reader.
    """
    cols, printable, dead = _decode_split(line, 6)
    if dead:
        return dead
    user, err = _parse_id(cols[0], "user")
    if err:
        return DeadLetter(err, printable)
    adgroup, err = _parse_id(cols[2], "adgroup_id")
    if err:
        return DeadLetter(err, printable)
    nonclk, clk = cols[4].strip(), cols[5].strip()
    if nonclk not in ("0", "1") or clk not in ("0", "1") or int(nonclk) + int(clk) != 1:
        return DeadLetter(f"bad label: nonclk={cols[4]!r} clk={cols[5]!r} (expected 0/1 "
                          f"summing to 1)", printable)
    ts, err = parse_timestamp(cols[1])
    if err is None and window is not None:
        err = window.check(ts)
    if err:
        return DeadLetter(err, printable)
    return AdSample(user, adgroup, ts, float(clk))


def parse_taobao_ad_feature(line: Union[bytes, str]) -> Union[Ad, DeadLetter]:
    """One ``ad_feature.csv`` line (``adgroup_id,cate_id,campaign_id,customer,brand,price``).

    Only adgroup_id, cate_id (numeric ids) and brand (numeric or ``NULL``) are used
    and checked; campaign_id, customer and price are not stored.
    """
    cols, printable, dead = _decode_split(line, 6)
    if dead:
        return dead
    adgroup, err = _parse_id(cols[0], "adgroup_id")
    if err:
        return DeadLetter(err, printable)
    cate, err = _parse_id(cols[1], "cate_id")
    if err:
        return DeadLetter(err, printable)
    brand, err = _parse_brand(cols[4])
    if err:
        return DeadLetter(err, printable)
    return Ad(adgroup, cate, brand)


def parse_taobao_ad_behavior(line: Union[bytes, str],
                             keep: Iterable[str] = tuple(TAOBAO_BEHAVIORS),
                             window: Optional[TimeWindow] = None) -> Parsed:
    """One ``behavior_log.csv`` line (``user,time_stamp,btag,cate,brand``) -> behavior.

    item = ``c{cate}_b{brand}``, category = cate, engage = the btag code (pv=1,
    cart=2, fav=3, buy=4, as the Taobao UserBehavior adapter), domain by cate
    (:func:`taobao_ad_domain`). Unknown btag or a timestamp outside ``window``: dead
    letter; a btag not in ``keep``: :class:`Filtered`.
    """
    cols, printable, dead = _decode_split(line, 5)
    if dead:
        return dead
    user, err = _parse_id(cols[0], "user")
    if err:
        return DeadLetter(err, printable)
    cate, err = _parse_id(cols[3], "cate")
    if err:
        return DeadLetter(err, printable)
    brand, err = _parse_brand(cols[4])
    if err:
        return DeadLetter(err, printable)
    btag = cols[2].strip().lower()
    if btag not in TAOBAO_BEHAVIORS:
        return DeadLetter(f"unknown behavior type: {cols[2]!r}", printable)
    ts, err = parse_timestamp(cols[1])
    if err is None and window is not None:
        err = window.check(ts)
    if err:
        return DeadLetter(err, printable)
    if btag not in keep:
        return Filtered(f"behavior type not kept: {btag}", printable)
    return (user, taobao_ad_item_key(cate, brand), cate, ts, float(TAOBAO_BEHAVIORS[btag]),
            taobao_ad_domain(cate))


# ----------------------------------------------------------------------------- synthetic


def check_synthetic_event(user_key: str, event, window: Optional[TimeWindow] = None
                          ) -> Optional[str]:
    """None if a generator event ``(item_key, cate_key, ts, engage, domain)`` is usable, else a reason."""
    try:
        item, cate, ts, engage, domain = event
    except (TypeError, ValueError):
        return "wrong column count: event is not a 5-tuple"
    return _check_generated(user_key, item, cate, ts, engage, domain, window)


def check_synthetic_impression(user_key: str, imp, window: Optional[TimeWindow] = None
                               ) -> Optional[str]:
    """None if a generator impression ``(item_key, cate_key, ts, label)`` is usable, else a reason."""
    try:
        item, cate, ts, label = imp
    except (TypeError, ValueError):
        return "wrong column count: impression is not a 4-tuple"
    if not isinstance(label, (int, float)) or not math.isfinite(float(label)):
        return f"bad label: {label!r}"
    return _check_generated(user_key, item, cate, ts, 0.0, DEFAULT_DOMAIN, window)


def _check_generated(user_key, item, cate, ts, engage, domain,
                     window: Optional[TimeWindow] = None) -> Optional[str]:
    for what, key in (("user_key", user_key), ("item_key", item), ("cate_key", cate)):
        if not isinstance(key, str) or not key:
            return f"bad key: {what}={key!r}"
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"bad timestamp: not an integer {ts!r}"
    if not 0 <= ts <= MAX_TIMESTAMP:
        return f"bad timestamp: outside [0, {MAX_TIMESTAMP}] {ts}"
    if window is not None:
        reason = window.check(ts)
        if reason:
            return reason
    if not isinstance(engage, (int, float)) or not math.isfinite(float(engage)):
        return f"bad engage: {engage!r}"
    if isinstance(domain, bool) or not isinstance(domain, int) or domain < 1:
        return f"bad domain: {domain!r} (domains start at 1; 0 is padding)"
    return None
