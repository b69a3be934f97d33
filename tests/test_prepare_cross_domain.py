"""Two-domain data (issue 18, METHODS 4.3 / 2.5): `lifelong prepare` with
--source taobao_ad (Tianchi 56 display-ad clicks), --movielens_domains genre and
--synthetic_domains 2. Domain 1 = target (impressions live there), 2 = source.

Each source runs once per module through the real Beam job (DirectRunner) on tiny
written files; the records are compared with hand-derived expectations.
"""
import argparse
import glob
import gzip
import hashlib
import os

import pytest

from beam_jobs import adapters as A
from beam_jobs import prepare as P
from beam_jobs import prepare_protocols as PR
from tests.test_prepare import ML_TOY_WINDOW, all_records, read_vocab, write_movielens
from tfmodels import schema as S


def run_prepare(argv):
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    return P.run(args, beam_args)


def dead_letters(out):
    got = []
    for path in sorted(glob.glob(os.path.join(out, "dead_letter", "rows-*.tsv"))):
        with open(path) as f:
            got.extend(tuple(line.rstrip("\n").split("\t", 1)) for line in f)
    return got


def keyed_records(out):
    """{split: {user_key: record with item / category KEYS instead of dense ids}}."""
    items = {int(i): k for i, k, _ in read_vocab(out, "items")}
    cates = {int(i): k for i, k, _ in read_vocab(out, "categories")}
    got = {}
    for split, recs in all_records(out).items():
        for r in recs:
            got.setdefault(split, {})[r["user_key"]] = {
                "hist": [(t, items[i], cates[c], e, d) for t, i, c, e, d in zip(
                    r["hist_ts"], r["hist_item_id"], r["hist_cate_id"], r["hist_engage"],
                    r["hist_domain"])],
                "imps": [(t, items[i], cates[c], lab, h) for t, i, c, lab, h in zip(
                    r["imp_ts"], r["imp_item_id"], r["imp_cate_id"], r["imp_label"],
                    r["imp_hist_index"])]}
    return got


# --------------------------------------------------------------------------------------
# Taobao display ads (Tianchi 56)
# --------------------------------------------------------------------------------------

D = {k: 1494000000 + (k - 6) * 86400 for k in range(3, 15)}  # 2017-05-k 00:00:00 UTC+8
AD_FEATURE = ["10,100,1,1,500,9.9",        # target (cate 100) -> item c100_b500
              "11,1999,1,1,NULL,5.0",      # target (1999 < 2000), brand NULL -> c1999_bNULL
              "12,2000,1,1,501,5.0",       # source (2000): its impressions are filtered
              "13,300,2,2,502,1.0",        # target; the lookup entry of adgroup 13
              "13,300,2,2,999,1.0",        # duplicate adgroup 13 (larger raw): dead letter
              "14,abc,1,1,1,1.0",          # non-numeric cate_id
              "15,100,1,1",                # wrong column count
              "16,400,1,1,503,2.0"]        # an ad without impressions: still the lookup entry
RAW_SAMPLE = [f"1,{D[6] + 100},10,430548_1007,0,1",   # u1 train, clicked
              f"1,{D[8] + 50},11,430548_1007,1,0",    # u1 train
              f"1,{D[9]},12,430539_1007,1,0",         # u1, source-domain ad: filtered
              f"1,{D[12] + 10},10,430548_1007,1,0",   # u1 valid (05-12, the last train day)
              f"1,{D[13] + 5},13,430548_1007,0,1",    # u1 test (05-13)
              f"2,{D[13] + 1000},10,430548_1007,1,0",  # u2 test
              f"2,{D[7]},99,430548_1007,1,0",         # unknown adgroup_id
              f"3,{D[10]},11,430548_1007,0,1",        # u3 train, no behaviors at all
              f"5,{D[7]},10,430548_1007,1,1",         # bad label (nonclk + clk = 2)
              f"5,{D[7]},10,430548_1007,0",           # wrong column count
              f"x,{D[7]},10,430548_1007,1,0",         # non-numeric user
              "5,1489939200,10,430548_1007,1,0",      # 2017-03-20: before the valid window
              ""]                                     # blank line
BEHAVIOR_LOG = ["1,1493776800,pv,5000,7",     # u1 05-03: source
                "1,1493859600,buy,5000,7",    # u1 05-04: source
                "1,1493956800,buy,100,500",   # u1 05-05: target
                f"1,{D[6] + 50},pv,2500,NULL",  # u1: source, brand NULL
                f"1,{D[6] + 100},fav,100,500",  # u1: same second as its first impression
                f"1,{D[12] + 20},pv,6000,8",    # u1: between the valid and the test impression
                f"1,{D[13] + 10},pv,100,500",   # u1: after its last impression: filtered
                f"2,{D[9]},cart,3000,9",         # u2: cart not kept: filtered
                f"2,{D[10]},pv,3000,9",          # u2: source
                f"2,{D[13] + 999},fav,300,502",  # u2: target, 1 s before its impression
                f"4,{D[7]},pv,100,500",          # u4 has no impression: filtered
                f"4,{D[8]},pv,5000,7",
                f"6,{D[7]},click,100,500",       # unknown behavior type
                f"6,{D[7]},pv,100",              # wrong column count
                f"6,{D[7]},pv,abc,500",          # non-numeric cate
                f"6,{D[7]},pv,100,x1",           # non-numeric brand
                "6,1494700000,pv,100,500"]       # 2017-05-14: after the valid window
DEAD_KINDS = {"duplicate_adgroup_id": 1, "non_numeric_id": 4, "wrong_column_count": 3,
              "unknown_adgroup_id": 1, "bad_label": 1, "timestamp_before_valid_window": 1,
              "blank_line": 1, "unknown_behavior_type": 1, "timestamp_after_valid_window": 1}
PV, CART, FAV, BUY = 1.0, 2.0, 3.0, 4.0
U1_EVENTS = [(1493776800, "c5000_b7", "5000", PV, 2), (1493859600, "c5000_b7", "5000", BUY, 2),
             (1493956800, "c100_b500", "100", BUY, 1), (D[6] + 50, "c2500_bNULL", "2500", PV, 2),
             (D[6] + 100, "c100_b500", "100", FAV, 1), (D[12] + 20, "c6000_b8", "6000", PV, 2)]
U2_EVENTS = [(D[10], "c3000_b9", "3000", PV, 2), (D[13] + 999, "c300_b502", "300", FAV, 1)]
EXPECTED_AD = {  # split -> user -> record; imps (ts, item, cate, label, imp_hist_index)
    "train": {"1": {"hist": U1_EVENTS[:5],
                    "imps": [(D[6] + 100, "c100_b500", "100", 1.0, 4),    # not its own-second fav
                             (D[8] + 50, "c1999_bNULL", "1999", 0.0, 5)]},
              "3": {"hist": [], "imps": [(D[10], "c1999_bNULL", "1999", 1.0, 0)]}},
    "valid": {"1": {"hist": U1_EVENTS[:5],
                    "imps": [(D[12] + 10, "c100_b500", "100", 0.0, 5)]}},
    "test": {"1": {"hist": U1_EVENTS, "imps": [(D[13] + 5, "c300_b502", "300", 1.0, 6)]},
             "2": {"hist": U2_EVENTS, "imps": [(D[13] + 1000, "c100_b500", "100", 0.0, 2)]}},
}


def write_taobao_ad(folder, headers=True, skip=()):
    os.makedirs(folder, exist_ok=True)
    body = {A.TAOBAO_AD_FEATURE: AD_FEATURE, A.TAOBAO_AD_RAW_SAMPLE: RAW_SAMPLE,
            A.TAOBAO_AD_BEHAVIOR_LOG: BEHAVIOR_LOG,
            A.TAOBAO_AD_USER_PROFILE: ["1,0,1,2,3,1,3,0,3"]}
    for name, lines in body.items():
        if name in skip:
            continue
        head = [A.TAOBAO_AD_HEADERS[name] + (" " if name == A.TAOBAO_AD_USER_PROFILE else "")]
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join((head if headers else []) + lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def ad_run(tmp_path_factory):
    folder = write_taobao_ad(str(tmp_path_factory.mktemp("ad_in")))
    out = str(tmp_path_factory.mktemp("ad_out"))
    report = run_prepare(["--source", "taobao_ad", "--input", folder, "--output", out,
                          "--num_shards", "2", "--taobao_keep_behaviors", "pv,fav,buy"])
    return folder, out, report


def test_taobao_ad_records(ad_run):
    _, out, report = ad_run
    assert report["protocol"] == "labeled_impressions_time_split"
    assert keyed_records(out) == EXPECTED_AD
    # the official days (UTC+8): 05-12 00:00 and 05-13 00:00
    assert (report["split_rule"]["train_end_ts"], report["split_rule"]["valid_end_ts"]) == \
        (D[12], D[13]) == (1494518400, 1494604800)
    assert {s: report["splits"][s]["records"] for s in S.SPLITS} == \
        {"train": 2, "valid": 1, "test": 2}
    assert report["stats"]["impressions"] == {"train": 3, "valid": 1, "test": 2}
    assert report["vocab"]["num_domains"] == 3


def test_taobao_ad_row_accounting(ad_run):
    _, out, report = ad_run
    rows = report["rows"]
    n_in = len(AD_FEATURE) + len(RAW_SAMPLE) + len(BEHAVIOR_LOG)
    assert (rows["input"], rows["used"], rows["filtered"], rows["dead_lettered"]) == \
        (n_in, 19, 5, 14) == (38, 19, 5, 14)
    assert rows["dead_letter_reasons"] == DEAD_KINDS
    assert rows["filtered_reasons"] == {"impression_not_target_domain": 1,
                                        "behavior_type_not_kept": 1,
                                        "after_last_impression": 1,
                                        "user_without_impressions": 2}
    assert rows["by_file"] == {
        "raw_sample.csv": {"input": 13, "used": 6, "filtered": 1, "dead_lettered": 6},
        "ad_feature.csv": {"input": 8, "used": 5, "filtered": 0, "dead_lettered": 3},
        "behavior_log.csv": {"input": 17, "used": 8, "filtered": 4, "dead_lettered": 5}}
    c = report["beam_counters"]
    assert (c["rows_input"], c["rows_used"], c["rows_filtered"], c["rows_dead_lettered"]) == \
        (38, 19, 5, 14)
    dead = dead_letters(out)
    assert len(dead) == 14
    by_raw = {raw: reason for reason, raw in dead}
    assert by_raw["13,300,2,2,999,1.0"] == "duplicate adgroup_id: 13 (first row kept)"
    assert by_raw[f"2,{D[7]},99,430548_1007,1,0"] == \
        "unknown adgroup_id: 99 (not in ad_feature.csv)"
    assert by_raw[f"5,{D[7]},10,430548_1007,1,1"].startswith("bad label: nonclk='1' clk='1'")
    assert by_raw[f"6,{D[7]},click,100,500"] == "unknown behavior type: 'click'"
    assert by_raw[f"6,{D[7]},pv,100,x1"] == "non-numeric id: brand='x1'"
    assert A.reason_kind(by_raw["6,1494700000,pv,100,500"]) == "timestamp_after_valid_window"
    w = report["valid_time_window"]
    assert (w["start_utc"], w["end_utc"]) == ("2017-04-21T16:00:00Z", "2017-05-13T15:59:59Z")


def test_taobao_ad_no_valid_split(ad_run, tmp_path):
    folder, _, _ = ad_run
    out = str(tmp_path / "o")
    report = run_prepare(["--source", "taobao_ad", "--input", folder, "--output", out,
                          "--num_shards", "1", "--taobao_ad_valid", "none"])
    # 05-12 is train now: u1's valid impression joins its train record; the cart row of
    # u2 is kept (default --taobao_keep_behaviors) and becomes its oldest behavior
    u2_cart = (D[9], "c3000_b9", "3000", CART, 2)
    assert keyed_records(out) == {
        "train": {"1": {"hist": U1_EVENTS[:5], "imps": EXPECTED_AD["train"]["1"]["imps"]
                        + EXPECTED_AD["valid"]["1"]["imps"]},
                  "3": EXPECTED_AD["train"]["3"]},
        "test": {"1": EXPECTED_AD["test"]["1"],
                 "2": {"hist": [u2_cart] + U2_EVENTS,
                       "imps": [(D[13] + 1000, "c100_b500", "100", 0.0, 3)]}}}
    assert report["split_rule"]["valid"].startswith("none")
    assert report["split_rule"]["train_end_ts"] == report["split_rule"]["valid_end_ts"] == D[13]
    assert "behavior_type_not_kept" not in report["rows"]["filtered_reasons"]


def test_taobao_ad_input_errors(tmp_path):
    out = str(tmp_path / "o")
    no_head = write_taobao_ad(str(tmp_path / "nohead"), headers=False)
    with pytest.raises(P.PrepareError, match=r"raw_sample.csv must start with the header "
                                             r"'user,time_stamp,adgroup_id"):
        run_prepare(["--source", "taobao_ad", "--input", no_head, "--output", out])
    missing = write_taobao_ad(str(tmp_path / "missing"), skip=(A.TAOBAO_AD_BEHAVIOR_LOG,))
    with pytest.raises(P.PrepareError, match="has no behavior_log.csv"):
        run_prepare(["--source", "taobao_ad", "--input", missing, "--output", out])
    with pytest.raises(P.PrepareError, match="needs --input"):
        run_prepare(["--source", "taobao_ad", "--output", out])
    with pytest.raises(P.PrepareError, match="labeled_impressions_time_split only"):
        run_prepare(["--source", "taobao_ad", "--input", missing, "--output", out,
                     "--protocol", "last_item_per_user"])
    with pytest.raises(P.PrepareError, match="labeled_impressions_time_split only"):
        run_prepare(["--output", out, "--protocol", "labeled_impressions_time_split"])
    # user_profile.csv is not needed (not read): a folder without it prepares
    no_profile = write_taobao_ad(str(tmp_path / "np"), skip=(A.TAOBAO_AD_USER_PROFILE,))
    P._check_taobao_ad_inputs(no_profile)


def test_taobao_ad_parsers():
    assert A.parse_taobao_ad_sample(b"7,1494000000,10,430548_1007,1,0\r") == \
        A.AdSample("7", "10", 1494000000, 0.0)
    assert A.parse_taobao_ad_feature("0010,2000,1,1,null,1") == A.Ad("10", "2000", "NULL")
    assert A.parse_taobao_ad_behavior("7,1494000000,BUY,0042,3") == \
        ("7", "c42_b3", "42", 1494000000, 4.0, A.TARGET_DOMAIN)
    assert A.parse_taobao_ad_behavior("7,1494000000,pv,2000,3")[5] == A.SOURCE_DOMAIN
    f = A.parse_taobao_ad_behavior("7,1494000000,cart,1,3", keep={"pv"})
    assert isinstance(f, A.Filtered) and A.reason_kind(f.reason) == "behavior_type_not_kept"
    assert A.parse_taobao_ad_sample("7,1494000000,10,p,0,2").reason.startswith("bad label")
    assert A.parse_taobao_ad_sample(b"\xff,1,1,p,1,0").reason == "bad encoding: not UTF-8"
    assert A.header_matches(b"\xef\xbb\xbfuser, time_stamp,adgroup_id,pid,nonclk,clk\r\n",
                            A.TAOBAO_AD_HEADERS["raw_sample.csv"])
    assert not A.header_matches("user,adgroup_id,time_stamp,pid,nonclk,clk",
                                A.TAOBAO_AD_HEADERS["raw_sample.csv"])
    with pytest.raises(ValueError, match="taobao_ad_valid"):
        A.taobao_ad_cuts("first_day")


# --------------------------------------------------------------------------------------
# MovieLens split into two domains by genre
# --------------------------------------------------------------------------------------

GENRE_MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Heat (1995),Action|Crime|Thriller
4,Balto (1995),Animation|Children
5,Some Film (2000),(no genres listed)
6,A Romance (2001),Romance
7,A Documentary (2002),Documentary|War
8,A Drama (2003),Drama|Romance
"""
# (user, movie, rating, ts). Target movies (first genre in the target set): 2, 4, 6, 7.
GENRE_RATINGS = [(1, 3, 4.0, 1000), (1, 2, 4.5, 1010), (1, 8, 3.0, 1020), (1, 4, 2.0, 1030),
                 (1, 6, 5.0, 1040), (1, 1, 4.0, 1050),
                 (2, 1, 4.0, 1005), (2, 5, 3.0, 1015),                    # no target rating
                 (3, 7, 4.0, 1012), (3, 99, 4.0, 1012), (3, 2, 1.0, 1025),  # 99: unknown movie
                 (4, 3, 5.0, 1001), (4, 6, 4.0, 1045), (4, 8, 2.0, 1048)]
GENRE_BAD = ["x,1,4.0,1000", "7,1,4.0"]
ADV, COM, ACT, ANI, ROM, DOC, DRA = ("Adventure", "Comedy", "Action", "Animation", "Romance",
                                     "Documentary", "Drama")
EXPECTED_ML = {  # hist (ts, movie, genre, rating, domain); imps (ts, movie, genre, label, index)
    "train": {"1": {"hist": [(1000, "3", ACT, 4.0, 2)],
                    "imps": [(1010, "2", COM, 1.0, 1)]},
              # the ts tie of user 3: movie 7 (dense id 9) before movie 99 (id 10)
              "3": {"hist": [(1012, "7", DOC, 4.0, 1), (1012, "99", "unknown", 4.0, 2)],
                    "imps": [(1012, "7", DOC, 1.0, 0), (1025, "2", COM, 0.0, 2)]}},
    "valid": {"1": {"hist": [(1000, "3", ACT, 4.0, 2), (1010, "2", COM, 4.5, 1),
                             (1020, "8", DRA, 3.0, 2), (1030, "4", ANI, 2.0, 1)],
                    "imps": [(1030, "4", ANI, 0.0, 3), (1040, "6", ROM, 1.0, 4)]}},
    "test": {"4": {"hist": [(1001, "3", ACT, 5.0, 2)], "imps": [(1045, "6", ROM, 1.0, 1)]}},
}


@pytest.fixture(scope="module")
def ml_genre_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlg_in")
    (folder / "movies.csv").write_text(GENRE_MOVIES)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(
        [f"{u},{m},{r},{t}" for u, m, r, t in GENRE_RATINGS] + GENRE_BAD) + "\n")
    out = str(tmp_path_factory.mktemp("mlg_out"))
    # fractions (0.5, 0.85) of the 6 TARGET ratings: cuts at the 4th (1030) and 6th (1045)
    report = run_prepare(["--source", "movielens", "--input", str(folder), "--output", out,
                          "--movielens_domains", "genre", "--train_fraction", "0.85",
                          "--valid_fraction", "0.35", "--num_shards", "1", *ML_TOY_WINDOW])
    return out, report


def test_movielens_genre_domains_records(ml_genre_run):
    out, report = ml_genre_run
    assert keyed_records(out) == EXPECTED_ML
    # the cuts are quantiles of the target-domain ratings (all 14 ratings: 1020 and 1045)
    assert (report["split_rule"]["train_end_ts"], report["split_rule"]["valid_end_ts"]) == \
        (1030, 1045)
    assert report["vocab"]["num_domains"] == 3
    rows = report["rows"]
    assert (rows["input"], rows["used"], rows["filtered"], rows["dead_lettered"]) == \
        (16, 10, 4, 2)
    assert rows["filtered_reasons"] == {"after_last_impression": 2,      # u1 1050, u4 1048
                                        "user_without_impressions": 2}   # u2
    assert rows["dead_letter_reasons"] == {"non_numeric_id": 1, "wrong_column_count": 1}
    assert report["stats"]["impressions"] == {"train": 3, "valid": 2, "test": 1}


def test_movielens_domain_table():
    genres = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery",
              "Romance", "Sci-Fi", "Thriller", "War", "Western", A.NO_GENRES,
              A.UNKNOWN_CATEGORY]
    target = [g for g in genres if A.movielens_domain(g, "genre") == A.TARGET_DOMAIN]
    assert target == ["Animation", "Children", "Comedy", "Documentary", "Musical", "Romance"]
    assert all(A.movielens_domain(g, "genre") == A.SOURCE_DOMAIN
               for g in genres if g not in target)
    assert all(A.movielens_domain(g) == A.DEFAULT_DOMAIN for g in genres)
    genre_of, _ = A.parse_movies_csv(GENRE_MOVIES)
    assert A.parse_movielens_rating("1,1,4.0,1000", genre_of, domains="genre")[5] == 2
    assert A.parse_movielens_rating("1,4,4.0,1000", genre_of, domains="genre")[5] == 1
    with pytest.raises(ValueError, match="movielens_domains"):
        A.movielens_domain("Comedy", "decade")


def test_domain_flags_are_checked(tmp_path):
    out = str(tmp_path / "o")
    ml = write_movielens(str(tmp_path / "ml"))
    with pytest.raises(P.PrepareError, match="--movielens_domains genre needs --source "
                                             "movielens with --protocol per_event_time_split"):
        run_prepare(["--source", "movielens", "--input", ml, "--output", out,
                     "--movielens_domains", "genre", "--protocol", "last_item_per_user"])
    with pytest.raises(P.PrepareError, match="--movielens_domains genre needs"):
        run_prepare(["--output", out, "--movielens_domains", "genre"])
    with pytest.raises(P.PrepareError, match="--synthetic_domains must be 1 or 2 with "
                                             "--source synthetic"):
        run_prepare(["--source", "movielens", "--input", ml, "--output", out,
                     "--synthetic_domains", "2"])
    with pytest.raises(P.PrepareError, match="cannot use --protocol last_item_per_user"):
        run_prepare(["--output", out, "--synthetic_domains", "2", "--protocol",
                     "last_item_per_user"])


def test_per_event_two_domains_max_history_gap():
    # target rows at 0, 5 (train) and 9 (test); source rows elsewhere; max_history 2
    dom = [1, 2, 2, 2, 2, 1, 2, 2, 2, 1, 2]
    events = [(f"i{k}", "c", 100 + k, 4.0, d) for k, d in enumerate(dom)]
    ids = {f"i{k}": S.FIRST_ID + k for k in range(len(dom))}
    recs, summary = PR.per_event_user("u", events, ids, {"c": 2}, (106, None), 4.0, 2)
    assert [r["split"] for r in recs] == ["train", "valid"]
    assert recs[0]["hist"]["hist_ts"] == [100, 101, 102, 103, 104]   # [0, 5)
    assert recs[0]["imps"]["imp_hist_index"] == [0, 5]
    assert recs[1]["hist"]["hist_ts"] == [107, 108]                   # [9 - 2, 9)
    assert recs[1]["imps"]["imp_hist_index"] == [2]
    # row 6 (ts 106) is in no record: max_history; row 10 after the last impression
    assert summary["filtered"] == {"max_history": 1, "after_last_impression": 1}
    assert summary["used_rows"] == 9 and summary["domains"] == {"1": 3, "2": 6}


# --------------------------------------------------------------------------------------
# synthetic: --synthetic_domains 2, and the one-domain outputs unchanged
# --------------------------------------------------------------------------------------

SYN_SMALL = ["--synthetic_users", "12", "--synthetic_mean_history", "20",
             "--synthetic_max_history", "40", "--num_shards", "1"]


def _records(path):
    """The records of one gzip TFRecord file (length, crc, data, crc framing)."""
    with gzip.open(path) as fh:
        buf = fh.read()
    out, pos = [], 0
    while pos < len(buf):
        n = int.from_bytes(buf[pos:pos + 8], "little")
        out.append(buf[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
    return out


def _digest(out):
    """sha256 of each split's records in sorted order, then the vocabularies: the
    content, whatever the shard writer's order (session 8's write_split orders a shard
    by record hash; the same records in the earlier writer's file order hashed to
    b445a205... / 4215165c... at commit 7582690; the sorted-record digests below were
    computed on commit 0ce971d, before the writer changed, and are equal on this one)."""
    h = hashlib.sha256()
    for split in S.SPLITS:
        recs = [r for f in sorted(glob.glob(os.path.join(out, f"{split}-*")))
                for r in _records(f)]
        for r in sorted(recs):
            h.update(r)
    for name in ("items", "categories", "users"):
        with open(os.path.join(out, "vocab", f"{name}.tsv"), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def test_one_domain_outputs_are_byte_identical(tmp_path):
    """Records and vocabularies of the default synthetic and MovieLens runs have the
    digests measured before the two-domain options existed (commit 7582690)."""
    run_prepare(["--output", str(tmp_path / "syn"), *SYN_SMALL])
    assert _digest(str(tmp_path / "syn")) == \
        "0abaa9d4ec991efcd26e601356d4153e742f380fa1db77e357bdd620bd9f0a4f"
    ml = write_movielens(str(tmp_path / "ml_in"))
    run_prepare(["--source", "movielens", "--input", ml, "--output", str(tmp_path / "ml"),
                 "--num_shards", "1", *ML_TOY_WINDOW])
    assert _digest(str(tmp_path / "ml")) == \
        "8cc2702b97314d07ccf264f6260a9bd396a2c286458bae60247f5ba51a9f7f35"


def test_synthetic_two_domains_prepare(tmp_path):
    out = str(tmp_path / "syn2")
    # histories longer than the recent window (100), where the source domain dominates
    report = run_prepare(["--output", out, "--synthetic_users", "6", "--synthetic_mean_history",
                          "200", "--synthetic_max_history", "300", "--num_shards", "1",
                          "--synthetic_domains", "2"])
    assert report["synthetic_config"]["num_domains"] == 2
    assert report["vocab"]["num_domains"] == 3
    recs = keyed_records(out)
    n_imps = hist_target = hist_source = 0
    for split in recs.values():
        for r in split.values():
            for _, item, cate, _, dom in r["hist"]:
                assert (item[0], cate[0]) == (("i", "c") if dom == 1 else ("s", "s"))
                hist_target += dom == 1
                hist_source += dom == 2
            for _, item, cate, _, idx in r["imps"]:
                assert (item[0], cate[0]) == ("i", "c")   # candidates: target domain only
                assert idx == len(r["hist"])
                n_imps += 1
    assert n_imps == 6 * 32
    assert hist_source > 2 * hist_target > 0
    rows = report["rows"]
    assert rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]


def test_domain_constants_mirror_the_schema():
    from beam_jobs import synthetic
    assert (A.TARGET_DOMAIN, A.SOURCE_DOMAIN) == (S.TARGET_DOMAIN, S.SOURCE_DOMAIN) == \
        (synthetic.TARGET_DOMAIN, synthetic.SOURCE_DOMAIN) == (1, 2)
    assert A.DEFAULT_DOMAIN == S.DEFAULT_DOMAIN == PR.TARGET_DOMAIN
