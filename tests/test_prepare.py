"""Tests of the sample-building job (beam_jobs.prepare) and its row adapters.

Each pipeline runs once per module (module-scoped fixtures); the pure per-user
functions and the adapters are tested directly.
"""
import argparse
import glob
import json
import os
import random
import time

import numpy as np
import pytest

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from beam_jobs import adapters as A
from beam_jobs import prepare as P
from beam_jobs import prepare_protocols as PR
from beam_jobs import prepare_transforms as PT
from beam_jobs import prepare_vocab as PV
from tfmodels import schema as S

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def run_prepare(argv):
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    return P.run(args, beam_args)


def read_records(out, split):
    files = sorted(glob.glob(S.split_pattern(out, split)))
    recs = []
    for f in files:
        recs.extend(r.numpy() for r in tf.data.TFRecordDataset(f, compression_type="GZIP"))
    return recs


def shard_bytes(out, split):
    """{shard file name: its bytes}: two runs over the same input must write the same
    files, not only the same records (a seeded file shuffle reads them by name)."""
    return {os.path.basename(f): open(f, "rb").read()
            for f in sorted(glob.glob(S.split_pattern(out, split)))}


def as_dict(raw):
    ex = tf.train.Example.FromString(raw)
    out = {}
    for name, dtype in S.USER_RECORD_FIELDS.items():
        feat = ex.features.feature[name]
        if dtype == tf.string:
            out[name] = feat.bytes_list.value[0].decode()
        elif dtype == tf.float32:
            out[name] = list(feat.float_list.value)
        else:
            out[name] = list(feat.int64_list.value)
    out["user_id"] = out["user_id"][0]
    return out


def all_records(out):
    return {s: [as_dict(r) for r in read_records(out, s)] for s in S.SPLITS}


def read_vocab(out, name):
    with open(os.path.join(out, "vocab", f"{name}.tsv")) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


# --------------------------------------------------------------------------------------
# tiny MovieLens
# --------------------------------------------------------------------------------------

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Heat (1995),Action|Crime|Thriller
4,"Good, the Bad and the Ugly, The (1966)",Action|Adventure|Western
5,Some Film (2000),(no genres listed)
"""
# (user, movie, rating, ts); movie 99 is missing from movies.csv; user 3 has a time tie.
GOOD = [
    (1, 1, 4.0, 1000), (1, 2, 3.5, 1010), (1, 3, 5.0, 1020), (1, 99, 4.0, 1030), (1, 4, 2.0, 1040),
    (2, 2, 4.5, 1005), (2, 1, 1.0, 1015), (2, 5, 4.0, 1025),
    (3, 3, 3.0, 1002), (3, 4, 4.0, 1012), (3, 1, 5.0, 1012),
    (4, 1, 0.5, 1003), (4, 2, 4.0, 1033), (4, 3, 4.0, 1043), (4, 5, 3.0, 1050),
    (5, 1, 4.0, 1008),
    (6, 2, 2.5, 1021), (6, 3, 4.0, 1031), (6, 1, 4.5, 1041), (6, 4, 4.0, 1051),
]
BAD = {  # raw line -> reason kind
    "x,1,4.0,1000": "non_numeric_id",
    "7,abc,4.0,1000": "non_numeric_id",
    "7,1,4.0": "wrong_column_count",
    "7,1,4.0,1000,extra": "wrong_column_count",
    "7,1,4.0,12.5": "bad_timestamp",
    "7,1,4.0,-3": "bad_timestamp",
    "7,1,4.0,9999999999": "bad_timestamp",
    "7,1,6.0,1000": "bad_rating",
    "7,1,0.0,1000": "bad_rating",
    "7,1,abc,1000": "bad_rating",
    "": "blank_line",
}
GENRE = {1: "Adventure", 2: "Comedy", 3: "Action", 4: "Action", 5: "(no genres listed)",
         99: "unknown"}
# The toy ratings above are dated 1970 (ts ~ 1000), before MovieLens's default valid window
# (1995-01-01 on): the runs on them declare a window that holds them.
ML_TOY_WINDOW = ["--valid_time_window", "0,5000"]


def write_movielens(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "movies.csv"), "w") as f:
        f.write(MOVIES)
    lines = [f"{u},{m},{r},{t}" for u, m, r, t in GOOD] + list(BAD)
    random.Random(3).shuffle(lines)
    with open(os.path.join(folder, "ratings.csv"), "w") as f:
        f.write("userId,movieId,rating,timestamp\n" + "\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def ml_input(tmp_path_factory):
    return write_movielens(str(tmp_path_factory.mktemp("ml_in")))


@pytest.fixture(scope="module")
def ml_run(ml_input, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ml_out"))
    report = run_prepare(["--source", "movielens", "--input", ml_input, "--output", out,
                          "--num_shards", "2", *ML_TOY_WINDOW])
    return out, report


def test_movielens_row_accounting(ml_run):
    out, report = ml_run
    rows = report["rows"]
    assert rows["input"] == len(GOOD) + len(BAD) == 31
    assert rows["used"] == len(GOOD)
    assert rows["filtered"] == 0
    assert rows["dead_lettered"] == len(BAD)
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    want = {}
    for kind in BAD.values():
        want[kind] = want.get(kind, 0) + 1
    assert rows["dead_letter_reasons"] == want
    # the Beam counters agree with the pipeline's own counts
    c = report["beam_counters"]
    assert c["rows_input"] == 31 and c["rows_dead_lettered"] == 11 and c["rows_used"] == 20
    assert c["dead_letter_bad_timestamp"] == 3
    with open(os.path.join(out, S.META_FILE)) as f:
        assert json.load(f)["rows"] == rows


def test_movielens_dead_letter_file(ml_run):
    out, _ = ml_run
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "dead_letter", "rows-*.tsv"))):
        with open(path) as f:
            lines.extend(line.rstrip("\n") for line in f)
    assert len(lines) == len(BAD)
    got = {}
    for line in lines:
        reason, raw = line.split("\t", 1)
        got[raw] = reason
    assert set(got) == set(BAD)
    for raw, kind in BAD.items():
        assert A.reason_kind(got[raw]) == kind, (raw, got[raw])
    assert got["7,1,4.0"] == "wrong column count: 3 != 4"
    assert got[""] == "blank line"


def test_movielens_vocab(ml_run):
    out, report = ml_run
    items = read_vocab(out, "items")
    # counts: movie 1 x6, 2 x4, 3 x4, 4 x3, 5 x2, 99 x1; ties broken by key
    assert items == [("2", "1", "6"), ("3", "2", "4"), ("4", "3", "4"), ("5", "4", "3"),
                     ("6", "5", "2"), ("7", "99", "1")]
    cates = read_vocab(out, "categories")
    assert [c[1] for c in cates] == ["Action", "Adventure", "Comedy", "(no genres listed)",
                                     "unknown"]
    assert [int(c[0]) for c in cates] == list(range(2, 7))
    users = read_vocab(out, "users")
    assert [u[1] for u in users] == ["1", "4", "6", "2", "3", "5"]
    assert [int(u[0]) for u in users] == list(range(S.FIRST_ID, S.FIRST_ID + 6))
    v = report["vocab"]
    assert v["num_items"] == 8 and v["num_categories"] == 7 and v["num_users"] == 8
    assert v["num_domains"] == 2


def test_movielens_meta(ml_run):
    out, report = ml_run
    with open(os.path.join(out, S.META_FILE)) as f:
        meta = json.load(f)
    assert meta["source"] == "movielens" and meta["protocol"] == "per_event_time_split"
    assert meta["seed"] == 0
    st = meta["stats"]
    assert st["users"] == 6 and st["items"] == 6 and st["events"] == 20
    assert st["impressions"] == {"train": 14, "valid": 2, "test": 4}
    assert set(st["positive_rate"]) == set(S.SPLITS)
    assert set(st["history_length"]) >= {"mean", "median", "max"}
    assert meta["args"]["source"] == "movielens"
    assert S.Vocab.from_meta(meta).num_items == 8
    assert meta["split_rule"]["train_end_ts"] == 1033
    assert meta["split_rule"]["valid_end_ts"] == 1041


def _expected_user_events(item_ids):
    by_user = {}
    for u, m, r, t in GOOD:
        by_user.setdefault(str(u), []).append((t, item_ids[str(m)], m, r))
    return {u: sorted(evs) for u, evs in by_user.items()}


def test_movielens_records(ml_run):
    out, _ = ml_run
    recs = all_records(out)
    item_ids = {k: int(i) for i, k, _ in read_vocab(out, "items")}
    cate_ids = {k: int(i) for i, k, _ in read_vocab(out, "categories")}
    user_ids = {k: int(i) for i, k, _ in read_vocab(out, "users")}
    events = _expected_user_events(item_ids)
    ts_sorted = sorted(t for *_, t in GOOD)
    cut1, cut2 = ts_sorted[int(0.7 * 20)], ts_sorted[int(0.8 * 20)]
    seen = set()
    for split, lo, hi in (("train", 0, cut1), ("valid", cut1, cut2), ("test", cut2, 10 ** 12)):
        for r in recs[split]:
            u = r["user_key"]
            assert r["user_id"] == user_ids[u]
            evs = events[u]
            # history = the user's events in stable (ts, item id) order, up to the last impression
            n_hist = len(r["hist_ts"])
            assert max(r["imp_hist_index"]) == n_hist  # stored once, nothing unseen
            assert r["hist_ts"] == [e[0] for e in evs[:n_hist]]
            assert r["hist_item_id"] == [e[1] for e in evs[:n_hist]]
            assert r["hist_cate_id"] == [cate_ids[GENRE[e[2]]] for e in evs[:n_hist]]
            assert r["hist_engage"] == [e[3] for e in evs[:n_hist]]
            assert r["hist_domain"] == [1] * n_hist
            for j, p in enumerate(r["imp_hist_index"]):
                t, item, movie, rating = evs[p]  # the impression is the event at position p
                assert (r["imp_ts"][j], r["imp_item_id"][j]) == (t, item)
                assert r["imp_cate_id"][j] == cate_ids[GENRE[movie]]
                assert r["imp_label"][j] == (1.0 if rating >= 4.0 else 0.0)
                assert lo <= t < hi
                # visible rows are exactly the strictly earlier events in stable order
                assert all((e[0], e[1]) < (t, item) for e in evs[:p])
                assert all((e[0], e[1]) >= (t, item) for e in evs[p:])
                seen.add((u, t, movie))
    assert len(seen) == 20  # every valid event is exactly one impression
    # the time tie of user 3 (ts 1012, movies 4 and 1) is ordered by dense item id
    u3 = [r for r in recs["train"] if r["user_key"] == "3"][0]
    assert u3["imp_item_id"] == [item_ids["3"], item_ids["1"], item_ids["4"]]
    # train records never contain test-period behaviors
    assert all(t < cut1 for r in recs["train"] for t in r["hist_ts"])
    assert all(t < cut2 for r in recs["valid"] for t in r["hist_ts"])


@pytest.mark.slow  # ~15 s: two worker processes each import TensorFlow
def test_movielens_multiprocessing_same_outputs(ml_run, ml_input, tmp_path_factory):
    out, report = ml_run
    out_mp = str(tmp_path_factory.mktemp("ml_out_mp"))
    report_mp = run_prepare(["--source", "movielens", "--input", ml_input, "--output", out_mp,
                             "--num_shards", "2", "--direct_running_mode=multi_processing",
                             "--direct_num_workers=2", *ML_TOY_WINDOW])
    for split in S.SPLITS:
        # the in-process runner and two worker processes write byte-identical shards
        assert shard_bytes(out, split) == shard_bytes(out_mp, split)
        assert len(shard_bytes(out, split)) == 2
    for name in ("items", "categories", "users"):
        assert read_vocab(out, name) == read_vocab(out_mp, name)
    for key in ("vocab", "stats", "rows", "split_rule"):
        assert report[key] == report_mp[key]


# --------------------------------------------------------------------------------------
# the older MovieLens layouts (ml-1m / ml-10m .dat, ml-100k u.data / u.item)
# --------------------------------------------------------------------------------------

# movie -> (title, genres as the csv releases list them); movie 6 is "Children's" first in
# the older layouts, movie 99 is rated but in no movie file
LAYOUT_MOVIES = {1: ("Toy Story (1995)", ["Adventure", "Animation", "Children", "Comedy",
                                          "Fantasy"]),
                 2: ("American President, The (1995)", ["Comedy", "Drama", "Romance"]),
                 3: ("Heat (1995)", ["Action", "Crime", "Thriller"]),
                 4: ("Good, the Bad and the Ugly, The (1966)", ["Action", "Adventure",
                                                                "Western"]),
                 5: ("Some Film (2000)", []),
                 6: ("Kids Film (1990)", ["Children", "Comedy"])}
LAYOUT_RATINGS = GOOD + [(5, 6, 3.0, 1060), (2, 6, 5.0, 1070)]


def write_movielens_layout(folder, layout):
    """LAYOUT_MOVIES / LAYOUT_RATINGS written as the csv, dat (ml-1m) or 100k release
    would ship them (the older ones: "Children's", Latin-1 titles, no header)."""
    os.makedirs(folder, exist_ok=True)
    old = {g: "Children's" if g == "Children" else g for m in LAYOUT_MOVIES.values()
           for g in m[1]}
    if layout == "csv":
        movies = "movieId,title,genres\n" + "".join(
            f'{m},"{t}",{"|".join(g) or "(no genres listed)"}\n'
            for m, (t, g) in LAYOUT_MOVIES.items())
        ratings = "userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{m},{r},{t}\n" for u, m, r, t in LAYOUT_RATINGS)
    elif layout == "dat":
        movies = "".join(f"{m}::{t} \xe9::{'|'.join(old[x] for x in g)}\n"
                         for m, (t, g) in LAYOUT_MOVIES.items() if g)
        movies += "5::Some Film (2000)::(no genres listed)\n"
        ratings = "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in LAYOUT_RATINGS)
    else:
        def flags(g):
            names = [old[x] for x in g] or ["unknown"]
            return "|".join("1" if n in names else "0" for n in A.ML100K_GENRES)
        movies = "".join(f"{m}|{t} \xe9|01-Jan-1995||http://x?{m}|{flags(g)}\n"
                         for m, (t, g) in LAYOUT_MOVIES.items())
        ratings = "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in LAYOUT_RATINGS)
    lay = {x.name: x for x in A.MOVIELENS_LAYOUTS}[layout]
    with open(os.path.join(folder, lay.movies), "w", encoding="latin-1") as f:
        f.write(movies)
    with open(os.path.join(folder, lay.ratings), "w") as f:
        f.write(ratings)
    return folder


def test_older_movielens_layouts_prepare_the_same_records_as_csv(tmp_path):
    outs = {}
    for layout in ("csv", "dat", "100k"):
        folder = write_movielens_layout(str(tmp_path / f"in-{layout}"), layout)
        outs[layout] = str(tmp_path / f"out-{layout}")
        report = run_prepare(["--source", "movielens", "--input", folder, "--output",
                              outs[layout], "--num_shards", "2", *ML_TOY_WINDOW])
        assert report["rows"]["used"] == len(LAYOUT_RATINGS), layout
        assert report["rows"]["dead_lettered"] == 0, layout
    for layout in ("dat", "100k"):
        for split in S.SPLITS:
            assert shard_bytes(outs[layout], split) == shard_bytes(outs["csv"], split), \
                (layout, split)
        for name in ("items", "categories"):
            assert read_vocab(outs[layout], name) == read_vocab(outs["csv"], name), layout
    assert "Children" in {row[1] for row in read_vocab(outs["dat"], "categories")}


def test_older_movielens_movie_files_and_lines():
    dat = ("1::Toy Story (1995)::Animation|Children's|Comedy\n"
           "2::Kids (1990)::Children's|Comedy\n\nx::Bad::Drama\n3::No genres\n")
    genres, bad = A.parse_movies_dat(dat)
    assert genres == {"1": "Animation", "2": "Children"} and bad == 2
    n = len(A.ML100K_GENRES)
    item = ("7|Film|01-Jan-1995||url|" + "|".join(["0"] * 4 + ["1"] + ["0"] * (n - 5)) + "\n"
            "8|Other|||url|" + "|".join(["1"] + ["0"] * (n - 1)) + "\n"
            "9|Short|x\n" + "10|Bad flags|||url|" + "|".join(["2"] * n) + "\n")
    genres, bad = A.parse_u_item(item)
    assert genres == {"7": "Children", "8": "(no genres listed)"} and bad == 2
    assert A.parse_movielens_rating("1::7::4::978300760", genres, sep="::") == \
        ("1", "7", "Children", 978300760, 4.0, 1)
    assert A.parse_movielens_rating("1\t7\t4\t978300760", genres, sep="\t")[1] == "7"
    r = A.parse_movielens_rating("1::7::4", genres, sep="::")
    assert isinstance(r, A.DeadLetter) and A.reason_kind(r.reason) == "wrong_column_count"


def test_movielens_folder_errors_name_the_layouts(tmp_path):
    out = str(tmp_path / "o")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "ratings.dat").write_text("1::2::3::4\n")
    with pytest.raises(P.PrepareError, match=r"has ratings.dat but not its movie file.*"
                                             r"ratings.dat \+ movies.dat \(ml-1m, ml-10m\)"):
        run_prepare(["--source", "movielens", "--input", str(tmp_path / "only"),
                     "--output", out])
    (tmp_path / "only" / "movies.dat").write_text("2::T::Drama\n")
    (tmp_path / "only" / "ratings.dat").write_text("1,2,3,4\n")
    with pytest.raises(P.PrepareError, match="expected 4 columns separated by '::'"):
        run_prepare(["--source", "movielens", "--input", str(tmp_path / "only"),
                     "--output", out])


# --------------------------------------------------------------------------------------
# pure per-user logic, adapters, cuts, vocab
# --------------------------------------------------------------------------------------


def test_adapters_movielens_and_taobao():
    genres, bad = A.parse_movies_csv(MOVIES + 'x,"broken\n')
    assert genres["2"] == "Comedy" and genres["4"] == "Action"
    assert genres["5"] == "(no genres listed)" and bad == 1
    assert A.parse_movielens_rating(b"1,2,4.5,100\r", genres) == ("1", "2", "Comedy", 100, 4.5, 1)
    assert A.parse_movielens_rating("1,42,4.5,100", genres)[2] == "unknown"
    assert isinstance(A.parse_movielens_rating(b"\xff\xfe,1,2,3", genres), A.DeadLetter)
    assert A.parse_movielens_rating("1,2,nan,5", genres).reason.startswith("bad rating")
    assert A.parse_taobao_line("1,2,3,pv,1511544070") == ("1", "2", "3", 1511544070, 1.0, 1)
    assert A.parse_taobao_line("1,2,3,buy,1511544070")[4] == 4.0
    r = A.parse_taobao_line("1,2,3,clk,1511544070")
    assert isinstance(r, A.DeadLetter) and A.reason_kind(r.reason) == "unknown_behavior_type"
    assert A.parse_taobao_line("1,2,3,pv").reason == "wrong column count: 4 != 5"
    f = A.parse_taobao_line("1,2,3,cart,1511544070", keep={"pv"})
    assert isinstance(f, A.Filtered) and A.reason_kind(f.reason) == "behavior_type_not_kept"
    with pytest.raises(ValueError):
        A.parse_keep_behaviors("pv,click")


def test_max_history_rule_visible_rows_are_true_suffixes():
    rng = random.Random(0)
    events = [(f"i{rng.randrange(30)}", "c", 1000 + 10 * k, float(rng.randrange(1, 6)), 1)
              for k in range(40)]
    ids = {f"i{k}": S.FIRST_ID + k for k in range(30)}
    cuts = (1000 + 10 * 20, 1000 + 10 * 30)
    full, _ = PR.per_event_user("u", events, ids, {"c": 2}, cuts, 4.0, 0)
    for m in (1, 3, 7, 25):
        recs, summary = PR.per_event_user("u", events, ids, {"c": 2}, cuts, 4.0, m)
        assert summary["used_rows"] == 40
        for rec, ref in zip(recs, full):
            assert rec["imps"]["imp_ts"] == ref["imps"]["imp_ts"]
            hist, ref_hist = rec["hist"]["hist_ts"], ref["hist"]["hist_ts"]
            offset = len(ref_hist) - len(hist)
            assert ref_hist[offset:] == hist  # a suffix of the true history
            for p, p_ref in zip(rec["imps"]["imp_hist_index"], ref["imps"]["imp_hist_index"]):
                assert p == p_ref - offset >= 0
                assert p >= min(p_ref, m)  # sees at least its m most recent behaviors
            assert min(rec["imps"]["imp_hist_index"]) == min(
                min(ref["imps"]["imp_hist_index"]), m)
        S.encode_user_record(2, "u", recs[0]["hist"], recs[0]["imps"])


def test_last_item_user_negatives_and_filter():
    vocab = PV.build_vocab([(f"i{k}", (10 - k % 3, f"c{k % 4}")) for k in range(20)])
    cates = {f"c{k}": S.FIRST_ID + k for k in range(4)}
    keyed, summary = PR.last_item_user("u", [("i1", "c1", 5, 1.0, 1)] * 2, vocab, cates, 0)
    assert keyed is None and summary["filtered"] == {"user_too_few_behaviors": 2}
    labels = []
    for user in range(400):
        ev = [(f"i{(user + k) % 20}", f"c{(user + k) % 4}", 100 + k, 1.0, 1) for k in range(5)]
        (key, rec), summary = PR.last_item_user(str(user), ev, vocab, cates, 7, max_history=3)
        assert key == (104, str(user))
        assert rec["hist"]["hist_ts"] == [101, 102, 103]
        assert rec["imps"]["imp_hist_index"] == [3]
        assert summary["filtered"] == {"max_history": 1} and summary["used_rows"] == 4
        orig = vocab["ids"][ev[-1][0]]
        item = rec["imps"]["imp_item_id"][0]
        if rec["imps"]["imp_label"][0] == 0.0:
            assert item != orig
            key_of = vocab["keys"][item - S.FIRST_ID]
            assert rec["imps"]["imp_cate_id"][0] == cates[vocab["cates"][item - S.FIRST_ID]]
            assert key_of != ev[-1][0]
        else:
            assert item == orig
        labels.append(rec["imps"]["imp_label"][0])
    assert 0.4 < sum(labels) / len(labels) < 0.6
    assert PR.user_seed(0, "u") == PR.user_seed(0, "u") != PR.user_seed(1, "u")


def test_exact_cuts_and_vocab_helpers():
    rng = random.Random(1)
    xs = [rng.randrange(0, 50 * 3600) for _ in range(1000)]
    for fr in ((0.7, 0.8), (0.0, 1.0), (0.5, 0.5)):
        hist = {}
        for x in xs:
            hist[PT._hour(x)] = hist.get(PT._hour(x), 0) + 1
        plan = PT.plan_cuts(hist.items(), fr)
        fine = [x for x in xs if PT._in_plan(x, PT._hour, plan)]
        cuts = PT.finish_cuts(fine, PT._hour, plan)
        srt = sorted(xs)
        for f, c in zip(fr, cuts):
            k = int(f * len(xs))
            assert c == (srt[k] if k < len(xs) else None)
    assert PR.split_index(5, (6, 8)) == 0 and PR.split_index(6, (6, 8)) == 1
    assert PR.split_index(9, (6, 8)) == 2 and PR.split_index(9, (None, None)) == 0
    v = PV.build_vocab([("b", 3), ("a", 3), ("c", 1), ("d", 5)], min_count=2)
    assert v["keys"] == ["d", "a", "b"] and v["ids"]["d"] == S.FIRST_ID
    assert v["oov_keys"] == 1 and "c" not in v["ids"]


# --------------------------------------------------------------------------------------
# tiny Taobao: last_item_per_user
# --------------------------------------------------------------------------------------

TB_USERS = 200
TB_TYPES = ["pv", "pv", "pv", "cart", "fav", "buy"]
TB_START, TB_END = 1511539200, 1512316799  # 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 UTC+8


def taobao_lines():
    rng = random.Random(5)
    lines = []
    for u in range(TB_USERS):
        for k in range(rng.randrange(3, 8)):
            item = rng.randrange(60)
            lines.append(f"{100 + u},{item},{item % 7},{rng.choice(TB_TYPES)},"
                         f"{TB_START + rng.randrange(TB_END + 1 - TB_START)}")
    lines.append("999,5,5,pv,1511600000")   # a user with 2 behaviors: filtered
    lines.append("999,6,6,pv,1511600100")
    lines.append("998,5,5,clk,1511600000")  # unknown behavior type: dead letter
    lines.append("998,5,5,pv")              # wrong column count
    rng.shuffle(lines)
    return lines


@pytest.fixture(scope="module")
def tb_input(tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("tb_in")), "UserBehavior.csv")
    with open(path, "w") as f:
        f.write("\n".join(taobao_lines()) + "\n")
    return path


def _run_taobao(tb_input, tmp_path_factory, seed):
    out = str(tmp_path_factory.mktemp(f"tb_out_{seed}"))
    report = run_prepare(["--source", "taobao", "--input", tb_input, "--output", out,
                          "--seed", str(seed), "--taobao_keep_behaviors", "pv,fav,buy"])
    return out, report


@pytest.fixture(scope="module")
def tb_run(tb_input, tmp_path_factory):
    return _run_taobao(tb_input, tmp_path_factory, 0)


def test_taobao_last_item_per_user(tb_run):
    out, report = tb_run
    assert report["protocol"] == "last_item_per_user"
    # expected per-user kept behaviors from the raw lines
    users = {}
    n_cart = 0
    for line in taobao_lines():
        cols = line.split(",")
        if len(cols) != 5 or cols[3] == "clk":
            continue
        if cols[3] == "cart":
            n_cart += 1
            continue
        users.setdefault(cols[0], []).append((int(cols[4]), cols[1], cols[2]))
    kept = {u: sorted(e) for u, e in users.items() if len(e) >= 3}
    dropped_rows = sum(len(e) for u, e in users.items() if len(e) < 3)
    rows = report["rows"]
    assert rows["dead_letter_reasons"] == {"unknown_behavior_type": 1, "wrong_column_count": 1}
    assert rows["filtered_reasons"] == {"behavior_type_not_kept": n_cart,
                                        "user_too_few_behaviors": dropped_rows}
    assert rows["used"] == sum(len(e) for e in kept.values())
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    assert rows["input"] == len(taobao_lines())

    items = {k: int(i) for i, k, _ in read_vocab(out, "items")}
    recs = all_records(out)
    n = len(kept)
    assert {s: len(r) for s, r in recs.items()} == {
        "train": int(0.8 * n), "valid": int(0.9 * n) - int(0.8 * n), "test": n - int(0.9 * n)}
    order = sorted(kept, key=lambda u: (kept[u][-1][0], u))
    split_of = {u: ("train" if i < int(0.8 * n) else "valid" if i < int(0.9 * n) else "test")
                for i, u in enumerate(order)}
    cate_of = {v: k for k, v in {k: int(i) for i, k, _ in read_vocab(out, "categories")}.items()}
    negatives = 0
    for split, rs in recs.items():
        for r in rs:
            u = r["user_key"]
            evs = kept[u]
            assert split_of[u] == split
            assert len(r["imp_label"]) == 1
            assert r["imp_hist_index"] == [len(r["hist_ts"])] == [len(evs) - 1]
            assert r["hist_ts"] == [e[0] for e in evs[:-1]]
            assert r["imp_ts"] == [evs[-1][0]]
            target_id = items[evs[-1][1]]
            if r["imp_label"][0] == 1.0:
                assert r["imp_item_id"][0] == target_id
            else:
                negatives += 1
                assert r["imp_item_id"][0] != target_id
            # category = the item's category (item % 7 in this data)
            item_key = {v: k for k, v in items.items()}[r["imp_item_id"][0]]
            assert cate_of[r["imp_cate_id"][0]] == str(int(item_key) % 7)
    assert 0.35 * n < negatives < 0.65 * n


def test_taobao_determinism(tb_run, tb_input, tmp_path_factory):
    out0, _ = tb_run
    out0b, _ = _run_taobao(tb_input, tmp_path_factory, 0)
    out1, report1 = _run_taobao(tb_input, tmp_path_factory, 1)
    for split in S.SPLITS:
        assert shard_bytes(out0, split) == shard_bytes(out0b, split)
        assert read_records(out0, split)
    a = {(r["user_key"], r["imp_item_id"][0], r["imp_label"][0])
         for s in S.SPLITS for r in all_records(out0)[s]}
    b = {(r["user_key"], r["imp_item_id"][0], r["imp_label"][0])
         for s in S.SPLITS for r in all_records(out1)[s]}
    assert a != b and len(a) == len(b)
    assert report1["seed"] == 1


# --------------------------------------------------------------------------------------
# synthetic: labeled_impressions
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn_out"))
    report = run_prepare(["--output", out, "--synthetic_users", "40", "--synthetic_mean_history",
                          "30", "--synthetic_max_history", "80", "--num_shards", "3"])
    return out, report


def test_synthetic_records_parse(syn_run):
    out, report = syn_run
    assert report["source"] == "synthetic" and report["protocol"] == "labeled_impressions"
    cfg = report["synthetic_config"]
    assert cfg["num_users"] == 40 and cfg["seed"] == 0
    n_imps = 0
    vocab = S.Vocab.from_meta(report)
    for split in S.SPLITS:
        assert len(glob.glob(S.split_pattern(out, split))) == 3
        for raw in read_records(out, split):
            ex = tf.io.parse_single_example(raw, S.user_record_parse_spec())
            hist = tf.sparse.to_dense(ex["hist_item_id"]).numpy()
            idx = tf.sparse.to_dense(ex["imp_hist_index"]).numpy()
            # every impression comes after the whole history; history stored once
            assert (idx == len(hist)).all()
            assert hist.min() >= S.OOV_ID and hist.max() < vocab.num_items
            assert int(ex["user_id"]) < vocab.num_users
            n_imps += len(idx)
    assert n_imps == 40 * cfg["num_impressions"] == sum(report["stats"]["impressions"].values())
    rows = report["rows"]
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    assert report["stats"]["impressions"]["train"] == 32 * cfg["num_impressions"]


# --------------------------------------------------------------------------------------
# valid time windows: rows dated outside the source's range are dead-lettered and counted
# --------------------------------------------------------------------------------------

# Inside the Taobao window, with both inclusive bounds used (users 1..3, >= 3 rows each).
TW_GOOD = ["1,10,5,pv,1511539200", "1,11,5,pv,1511600000", "1,12,5,buy,1511700000",
           "2,10,5,pv,1511800000", "2,13,6,fav,1511900000", "2,14,6,pv,1512316799",
           "3,11,5,pv,1512000000", "3,12,5,pv,1512100000", "3,15,6,pv,1512200000"]
TW_OUT = {  # raw line -> reason kind
    "1,50,5,pv,1505088000": "timestamp_before_valid_window",    # 2017-09-11, as in the real head
    "2,51,5,pv,15115": "timestamp_before_valid_window",         # a line cut inside its timestamp
    "3,52,5,buy,1512316800": "timestamp_after_valid_window",    # 2017-12-04 00:00:00 UTC+8
    "3,53,5,cart,1505088000": "timestamp_before_valid_window",  # bad before "not kept"
}


@pytest.fixture(scope="module")
def tw_input(tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("tw_in")), "UserBehavior.csv")
    lines = TW_GOOD + list(TW_OUT)
    random.Random(7).shuffle(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _dead_letters(out):
    got = {}
    for path in sorted(glob.glob(os.path.join(out, "dead_letter", "rows-*.tsv"))):
        with open(path) as f:
            for line in f:
                reason, raw = line.rstrip("\n").split("\t", 1)
                got[raw] = reason
    return got


def test_taobao_rows_outside_the_valid_window_are_dead_lettered(tw_input, tmp_path):
    out = str(tmp_path / "o")
    report = run_prepare(["--source", "taobao", "--input", tw_input, "--output", out,
                          "--taobao_keep_behaviors", "pv,fav,buy"])
    rows = report["rows"]
    assert rows["dead_letter_reasons"] == {"timestamp_before_valid_window": 3,
                                           "timestamp_after_valid_window": 1}
    assert rows["input"] == len(TW_GOOD) + len(TW_OUT) == 13
    assert rows["used"] == len(TW_GOOD) and rows["filtered"] == 0
    assert rows["dead_lettered"] == len(TW_OUT)
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    assert report["beam_counters"]["dead_letter_timestamp_before_valid_window"] == 3
    dead = _dead_letters(out)
    assert {raw: A.reason_kind(r) for raw, r in dead.items()} == TW_OUT
    assert dead["2,51,5,pv,15115"] == ("timestamp before valid window: 15115 "
                                       "(1970-01-01T04:11:55Z) < 1511539200 (2017-11-24T16:00:00Z)")
    with open(os.path.join(out, S.META_FILE)) as f:
        meta = json.load(f)
    w = meta["valid_time_window"]
    assert (w["start"], w["end"]) == (TB_START, TB_END)
    assert (w["start_utc"], w["end_utc"]) == ("2017-11-24T16:00:00Z", "2017-12-03T15:59:59Z")
    assert w["from"] == "the taobao default" and meta["rows"] == rows
    # no out-of-window behavior became anyone's history or target; both bounds are inside
    recs = [r for split in S.SPLITS for r in all_records(out)[split]]
    times = sorted(t for r in recs for t in r["hist_ts"] + r["imp_ts"])
    assert times == sorted(int(line.rsplit(",", 1)[1]) for line in TW_GOOD)
    assert times[0] == TB_START and times[-1] == TB_END


def test_valid_time_window_flag_none_keeps_every_parsable_row(tw_input, tmp_path):
    report = run_prepare(["--source", "taobao", "--input", tw_input, "--output",
                          str(tmp_path / "o"), "--taobao_keep_behaviors", "pv,fav,buy",
                          "--valid_time_window", "none"])
    rows = report["rows"]
    assert rows["dead_lettered"] == 0
    assert rows["filtered_reasons"] == {"behavior_type_not_kept": 1}   # the cart row
    assert rows["used"] == len(TW_GOOD) + len(TW_OUT) - 1
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    assert report["valid_time_window"]["from"] == "--valid_time_window"
    assert (report["valid_time_window"]["start"], report["valid_time_window"]["end"]) == \
        (0, A.MAX_TIMESTAMP)


def test_movielens_default_window_dead_letters_1970_and_future_rows(tmp_path):
    now = int(time.time())
    good = [(1, 1, 4.0, 946684800), (1, 2, 3.0, 946684900), (1, 3, 5.0, 946685000),
            (2, 1, 2.0, 946685100), (2, 4, 4.5, 946685200)]        # 2000-01-01
    out_of_window = {f"1,4,4.0,{1000}": "timestamp_before_valid_window",       # 1970
                     f"2,2,4.0,{788918399}": "timestamp_before_valid_window",  # 1994-12-31
                     f"2,3,4.0,{now + 10 * 86400}": "timestamp_after_valid_window"}
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "movies.csv").write_text(MOVIES)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "\n".join(
            [f"{u},{m},{r},{t}" for u, m, r, t in good] + list(out_of_window)) + "\n")
    out = str(tmp_path / "o")
    report = run_prepare(["--source", "movielens", "--input", str(folder), "--output", out])
    rows = report["rows"]
    assert rows["dead_letter_reasons"] == {"timestamp_before_valid_window": 2,
                                           "timestamp_after_valid_window": 1}
    assert (rows["input"], rows["used"], rows["filtered"], rows["dead_lettered"]) == (8, 5, 0, 3)
    assert {raw: A.reason_kind(r) for raw, r in _dead_letters(out).items()} == out_of_window
    w = report["valid_time_window"]
    assert w["start"] == 788918400 and w["start_utc"] == "1995-01-01T00:00:00Z"
    assert now + 86400 - 5 <= w["end"] <= int(time.time()) + 86400


def test_synthetic_window_is_the_generators_own(syn_run):
    _, report = syn_run
    cfg = report["synthetic_config"]
    w = report["valid_time_window"]
    assert (w["start"], w["end"]) == tuple(A.synthetic_time_window(cfg))
    assert w["start"] == cfg["start_ts"] and w["from"] == "the synthetic default"
    assert report["rows"]["dead_lettered"] == 0
    window = A.TimeWindow(w["start"], w["end"])
    event = ("i1", "c1", cfg["start_ts"] - 1, 0.5, 1)
    assert A.reason_kind(A.check_synthetic_event("u1", event, window)) == \
        "timestamp_before_valid_window"
    assert A.check_synthetic_event("u1", event) is None            # no window: only 1970..2100
    imp = ("i1", "c1", w["end"] + 1, 1.0)
    assert A.reason_kind(A.check_synthetic_impression("u1", imp, window)) == \
        "timestamp_after_valid_window"


def test_parse_time_window():
    # a date alone is its first second as START and its last second as END (UTC)
    assert A.parse_time_window("2017-11-25,2017-12-03") == (1511568000, 1512345599)
    assert A.parse_time_window("2017-11-25T00:00:00+08:00,2017-12-03T23:59:59+08:00") == \
        (TB_START, TB_END) == A.default_time_window("taobao")
    assert A.parse_time_window("100,2000-01-01T00:00:00Z") == (100, 946684800)
    assert A.parse_time_window("now-2d,now+1d", now=1_000_000) == (1_000_000 - 2 * 86400,
                                                                   1_000_000 + 86400)
    assert A.parse_time_window("none") == (0, A.MAX_TIMESTAMP)
    assert A.default_time_window("movielens", now=1_600_000_000) == (788918400,
                                                                     1_600_000_000 + 86400)
    for bad, match in (("2017-12-03,2017-11-25", "is after"), ("2017-11-25", "START,END"),
                       ("yesterday,now", "not unix seconds"), ("0,2200-01-01", "1970 to 2100")):
        with pytest.raises(ValueError, match=match):
            A.parse_time_window(bad)


def test_bad_time_window_flag(tmp_path, ml_input):
    with pytest.raises(P.PrepareError, match="--valid_time_window '2017-12-03,2017-11-25': "
                                             "START 2017-12-03T00:00:00Z is after END"):
        run_prepare(["--source", "movielens", "--input", ml_input, "--output",
                     str(tmp_path / "o"), "--valid_time_window", "2017-12-03,2017-11-25"])


# --------------------------------------------------------------------------------------
# bad arguments / unusable input
# --------------------------------------------------------------------------------------


def test_bad_arguments(tmp_path, ml_input, ml_run):
    out = str(tmp_path / "o")
    with pytest.raises(P.PrepareError, match="needs --input"):
        run_prepare(["--source", "movielens", "--output", out])
    with pytest.raises(P.PrepareError, match="does not exist"):
        run_prepare(["--source", "movielens", "--input", str(tmp_path / "nope"), "--output", out])
    with pytest.raises(P.PrepareError, match="has no ratings.csv"):
        run_prepare(["--source", "movielens", "--input", str(tmp_path), "--output", out])
    with pytest.raises(P.PrepareError, match="is a folder"):
        run_prepare(["--source", "taobao", "--input", str(tmp_path), "--output", out])
    with pytest.raises(P.PrepareError, match="matches no file"):
        run_prepare(["--source", "taobao", "--input", str(tmp_path / "x*.csv"), "--output", out])
    with pytest.raises(P.PrepareError, match="unknown --protocol"):
        run_prepare(["--source", "movielens", "--input", ml_input, "--output", out,
                     "--protocol", "leave_one_out"])
    with pytest.raises(P.PrepareError, match="unknown --source"):
        run_prepare(["--source", "criteo", "--output", out])
    with pytest.raises(P.PrepareError, match="labeled_impressions"):
        run_prepare(["--source", "movielens", "--input", ml_input, "--output", out,
                     "--protocol", "labeled_impressions"])
    with pytest.raises(P.PrepareError, match="valid_fraction"):
        run_prepare(["--source", "movielens", "--input", ml_input, "--output", out,
                     "--valid_fraction", "0.9"])
    with pytest.raises(P.PrepareError, match="taobao_keep_behaviors"):
        run_prepare(["--source", "taobao", "--input", ml_input, "--output", out,
                     "--taobao_keep_behaviors", "click"])
    with pytest.raises(P.PrepareError, match="already holds"):
        run_prepare(["--source", "movielens", "--input", ml_input, "--output", ml_run[0]])
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(P.PrepareError, match="is empty"):
        run_prepare(["--source", "taobao", "--input", str(empty), "--output", out])


def test_no_valid_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,pv,1\n1,2,3\n\n")
    with pytest.raises(P.PrepareError, match="no usable rows"):
        run_prepare(["--source", "taobao", "--input", str(bad), "--output", str(tmp_path / "o")])


# --------------------------------------------------------------------------------------
# real MovieLens (optional)
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_movielens(movielens_dir, tmp_path):
    report = run_prepare(["--source", "movielens", "--input", movielens_dir,
                          "--output", str(tmp_path / "ml")])
    rows = report["rows"]
    assert rows["input"] == 100_836
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    assert report["stats"]["users"] == 610
    assert sum(report["stats"]["impressions"].values()) == rows["used"]


# --------------------------------------------------------------------------------------
# compact per-user records (issue 19 item 5): the same data as the full format
# --------------------------------------------------------------------------------------


def _decoded(out):
    table = S.load_item_table(out)
    return {s: {d["user_key"]: d for d in (S.decode_user_record(r, table)
                                            for r in read_records(out, s))} for s in S.SPLITS}


def _assert_same_records(full_out, compact_out):
    a, b = _decoded(full_out), _decoded(compact_out)
    n = 0
    for s in S.SPLITS:
        assert a[s].keys() == b[s].keys(), s
        for key, rec in a[s].items():
            assert set(rec) == set(b[s][key])
            for k in rec:   # exact, engagement included (half stars, behavior codes)
                np.testing.assert_array_equal(rec[k], b[s][key][k], err_msg=f"{s} {key} {k}")
            n += 1
    assert n > 0


def test_movielens_compact_records_equal_full(ml_run, ml_input, tmp_path):
    out = str(tmp_path / "compact")
    report = run_prepare(["--source", "movielens", "--input", ml_input, "--output", out,
                          "--num_shards", "2", "--record_format", "compact", *ML_TOY_WINDOW])
    assert report["format"] == S.FORMAT_COMPACT and ml_run[1]["format"] == S.FORMAT_FULL
    assert report["record"]["engage_step"] == 0.5
    assert report["record"]["engage_max_abs_error"] == 0.25
    table = S.load_item_table(out)
    items = read_vocab(out, "items")
    assert len(table) == len(items) + S.FIRST_ID == report["vocab"]["num_items"]
    _assert_same_records(ml_run[0], out)
    raw = read_records(out, "train")[0]
    assert "hist_cate_id" not in tf.train.Example.FromString(raw).features.feature


def test_taobao_compact_records_equal_full(tb_run, tb_input, tmp_path):
    out = str(tmp_path / "compact")
    run_prepare(["--source", "taobao", "--input", tb_input, "--output", out, "--seed", "0",
                 "--taobao_keep_behaviors", "pv,fav,buy", "--record_format", "compact"])
    _assert_same_records(tb_run[0], out)


def test_engage_step_flag_is_checked(tmp_path):
    with pytest.raises(P.PrepareError, match="power of two"):
        run_prepare(["--output", str(tmp_path / "a"), "--record_format", "compact",
                     "--engage_step", "0.3"])
    with pytest.raises(P.PrepareError, match="--record_format compact only"):
        run_prepare(["--output", str(tmp_path / "b"), "--engage_step", "0.5"])


def test_write_split_is_deterministic_and_writes_every_shard(tmp_path):
    """``write_split``: every record once, in the shard its bytes hash to, in a fixed
    order; a shard no record hashes to is still written (empty); two runs with the
    input in another order write the same bytes."""
    import apache_beam as beam
    from beam_jobs.sharded_io import shard_of, write_split
    recs = [f"record-{i}".encode() for i in range(40)]
    outs = []
    for k, order in enumerate((recs, recs[::-1])):
        out = str(tmp_path / f"run{k}")
        with beam.Pipeline() as p:
            _ = p | beam.Create(order) | write_split(out, "train", 3)
            _ = p | "One" >> beam.Create([b"only"]) | "W1" >> write_split(out, "valid", 4)
        outs.append(out)
    assert shard_bytes(outs[0], "train") == shard_bytes(outs[1], "train")
    files = sorted(glob.glob(S.split_pattern(outs[0], "train")))
    assert [os.path.basename(f) for f in files] == [
        f"train-{i:05d}-of-00003.tfrecord.gz" for i in range(3)]
    for i, f in enumerate(files):
        got = [r.numpy() for r in tf.data.TFRecordDataset(f, compression_type="GZIP")]
        assert got and all(shard_of(r, 3) == i for r in got)
    assert sorted(read_records(outs[0], "train")) == sorted(recs)
    valid = sorted(glob.glob(S.split_pattern(outs[0], "valid")))
    assert len(valid) == 4 and read_records(outs[0], "valid") == [b"only"]
    assert not glob.glob(os.path.join(outs[0], ".tmp-*"))
