"""Synthetic lifelong-sequence generator (beam_jobs/synthetic.py).

The key test is the oracle one: count features of the candidate's category in the
last 1000 behaviors must beat the same counts in the last 50 by a clear AUC margin,
so a short-window model measurably cannot match a long-window one on this data.
"""
import dataclasses
import json
import statistics
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from beam_jobs.synthetic import (
    SyntheticConfig,
    generate_user,
    generate_users,
    item_category,
    item_category_array,
    user_latents,
)

SMALL = SyntheticConfig(num_users=50, num_items=3000, num_categories=60, mean_history=400,
                        min_history=100, max_history=900, seed=7)


def _int(key: str) -> int:
    return int(key[1:])


# ----------------------------------------------------------------------------- determinism


def test_same_config_and_index_gives_identical_output():
    a = generate_user(SMALL, 3)
    b = generate_user(SyntheticConfig.from_dict(SMALL.to_dict()), 3)
    assert a == b
    assert a["user_key"] == "u3"


def test_different_seed_or_index_differs():
    a = generate_user(SMALL, 3)
    assert generate_user(dataclasses.replace(SMALL, seed=8), 3) != a
    assert generate_user(SMALL, 4) != a


def test_generate_users_matches_generate_user():
    got = list(generate_users(SMALL, [5, 1]))
    assert got == [generate_user(SMALL, 5), generate_user(SMALL, 1)]
    assert len(list(generate_users(dataclasses.replace(SMALL, num_users=3)))) == 3


# ----------------------------------------------------------------------------- structure


def test_events_and_impressions_structure():
    for u in range(SMALL.num_users):
        d = generate_user(SMALL, u)
        ev, imp = d["events"], d["impressions"]
        assert SMALL.min_history <= len(ev) <= SMALL.max_history
        ts = [e[2] for e in ev]
        assert ts == sorted(ts)
        assert ts[0] >= SMALL.start_ts
        assert len(imp) == SMALL.num_impressions
        assert min(i[2] for i in imp) > ts[-1]
        assert [i[2] for i in imp] == sorted(i[2] for i in imp)
        for item, cate, t, engage, domain in ev[:50] + ev[-50:]:
            assert type(item) is str and item[0] == "i"
            assert type(cate) is str and cate[0] == "c"
            assert type(t) is int and type(engage) is float and domain == 1
            assert 0.0 <= engage <= 1.0
        for item, cate, t, label in imp:
            assert type(t) is int and label in (0.0, 1.0) and type(label) is float
        json.dumps(d)  # plain Python values only


def test_timestamps_have_realistic_gaps():
    d = generate_user(SMALL, 0)
    gaps = np.diff([e[2] for e in d["events"]])
    assert gaps.min() >= 1
    assert np.median(gaps) < 3600           # mostly within-session minutes
    assert gaps.max() > 6 * 3600            # some session breaks of hours to days


def test_item_category_is_consistent_across_users():
    cat = item_category_array(SMALL)
    assert cat.shape == (SMALL.num_items,)
    assert np.bincount(cat, minlength=SMALL.num_categories).min() >= 1
    seen = {}
    for u in range(20):
        d = generate_user(SMALL, u)
        for item, cate, *_ in d["events"] + d["impressions"]:
            assert _int(cate) == cat[_int(item)]
            assert seen.setdefault(item, cate) == cate
    assert item_category(SMALL, 17) == int(cat[17])
    with pytest.raises(ValueError, match="item_index"):
        item_category(SMALL, SMALL.num_items)


def test_long_tail_users_reach_max_history():
    cfg = dataclasses.replace(SMALL, max_history=12000, long_tail_fraction=1.0)
    lens = [len(generate_user(cfg, u)["events"]) for u in range(3)]
    assert all(10_800 <= n <= 12_000 for n in lens)


def test_label_rate_and_engagement():
    cfg = SyntheticConfig()
    labels, eng_in, eng_out = [], [], []
    for u in range(150):
        d = generate_user(cfg, u)
        labels += [i[3] for i in d["impressions"]]
        lat = user_latents(cfg, u)
        interest = {f"c{c}" for c in lat["long_interests"] + lat["recent_pool"]}
        for e in d["events"]:
            (eng_in if e[1] in interest else eng_out).append(e[3])
    assert 0.2 <= np.mean(labels) <= 0.5
    assert np.mean(eng_in) > np.mean(eng_out) + 0.1


def test_long_interests_live_far_back():
    cfg = SyntheticConfig()
    recent, old = [], []
    for u in range(100):
        cats = np.array([_int(e[1]) for e in generate_user(cfg, u)["events"]])
        is_long = np.isin(cats, user_latents(cfg, u)["long_interests"])
        recent.append(is_long[-cfg.recent_window:].mean())
        old.append(is_long[:-cfg.recent_window].mean())
    assert np.mean(recent) < 0.06 and np.mean(old) > 0.3


# ----------------------------------------------------------------------------- the oracle


def _oracle_rows(cfg, num_users, short_len=50, long_len=1000):
    rows = []
    for u in range(num_users):
        d = generate_user(cfg, u)
        cats = [e[1] for e in d["events"]]
        short, long_ = cats[-short_len:], cats[-long_len:]
        for _, cate, _, label in d["impressions"]:
            rows.append((u, short.count(cate), long_.count(cate), label))
    return np.asarray(rows, dtype=np.float64)


def _fit_auc(rows, cols, train):
    x = rows[:, cols]
    x = np.hstack([x, np.log1p(x)])
    y = rows[:, 3]
    model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    return roc_auc_score(y[~train], model.predict_proba(x[~train])[:, 1])


def test_oracle_long_window_beats_short_window():
    cfg = SyntheticConfig()
    num_users = 400
    rows = _oracle_rows(cfg, num_users)
    train = rows[:, 0] < num_users // 2          # split by user
    auc_short = _fit_auc(rows, [1], train)
    auc_long = _fit_auc(rows, [2], train)
    auc_both = _fit_auc(rows, [1, 2], train)
    print(f"\noracle AUC (defaults, {num_users} users, {len(rows)} impressions, "
          f"CTR {rows[:, 3].mean():.3f}): short(last 50) {auc_short:.4f}  "
          f"long(last 1000) {auc_long:.4f}  short+long {auc_both:.4f}  "
          f"gap {auc_long - auc_short:.4f}")
    assert auc_long - auc_short >= 0.05
    assert auc_both - auc_short >= 0.05
    assert auc_long < 0.95 and auc_both < 0.95
    assert auc_short > 0.53  # the recent interest is still visible in the short window


# ----------------------------------------------------------------------------- config


def test_config_round_trip():
    cfg = dataclasses.replace(SyntheticConfig(), seed=3, max_history=100_000, label_bias=-1.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert SyntheticConfig.from_dict(d) == cfg
    assert SyntheticConfig.from_dict({}) == SyntheticConfig()
    assert SyntheticConfig.from_dict({"num_users": 10.0}).num_users == 10


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_categories=5, num_long_interests=3, recent_pool_size=4), "num_categories"),
    (dict(min_history=500, max_history=400), "min_history"),
    (dict(num_users=-1), "num_users"),
    (dict(num_items=0), "num_items"),
    (dict(num_items=50, num_categories=100), "num_items"),
    (dict(mean_history=0), "mean_history"),
    (dict(num_impressions=0), "num_impressions"),
    (dict(long_tail_fraction=1.5), "long_tail_fraction"),
    (dict(long_share_old=0.8, recent_share_old=0.3), "long_share_old"),
    (dict(engage_base_mean=1.0), "engage_base_mean"),
    (dict(seed=-1), "seed"),
    (dict(num_users=2.5), "num_users"),
    (dict(label_bias=float("nan")), "label_bias"),
])
def test_invalid_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


def test_from_dict_rejects_unknown_fields_and_bad_user_index():
    with pytest.raises(ValueError, match="num_userz"):
        SyntheticConfig.from_dict({"num_userz": 3})
    with pytest.raises(ValueError, match="user_index"):
        generate_user(SMALL, SMALL.num_users)
    with pytest.raises(ValueError, match="user_index"):
        generate_user(SMALL, -1)


# ----------------------------------------------------------------------------- speed


def test_generation_speed_10k_events():
    cfg = SyntheticConfig(mean_history=10_000, min_history=10_000, max_history=10_000)
    generate_user(cfg, 0)  # builds the shared item tables
    times = []
    for u in range(1, 8):
        t0 = time.perf_counter()
        d = generate_user(cfg, u)
        times.append(time.perf_counter() - t0)
        assert len(d["events"]) == 10_000
    med = statistics.median(times)
    print(f"\ngenerate_user with 10,000 events: median {med * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    assert med < 0.05
