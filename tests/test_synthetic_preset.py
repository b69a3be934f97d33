"""The named synthetic preset ``bench`` (issue 22 item 2), its flag precedence, the
distractor categories it uses, and the window oracle that calibrates it
(``beam_jobs/synthetic_presets.py``, docs/synthetic.md "The bench preset")."""
import argparse
import json

import numpy as np
import pytest

from beam_jobs import flags, synthetic_presets
from beam_jobs.synthetic import SyntheticConfig, generate_user, user_latents


def _prepare_args(*argv):
    p = argparse.ArgumentParser()
    flags.add_prepare_arguments(p)
    return p.parse_args(["--output", "unused"] + list(argv))


# ----------------------------------------------------------------------------- resolution


def test_bench_preset_resolves_as_documented():
    cfg = synthetic_presets.preset_config("bench")
    # sizes promised in docs/synthetic.md: 3,200 users x 48 impressions, 0.8 of the users
    # in the training split (the prepare default) -> 122,880 training impressions
    assert (cfg.num_users, cfg.num_impressions) == (3200, 48)
    assert int(0.8 * cfg.num_users) * cfg.num_impressions == 122_880 >= 100_000
    # lifelong users: 1 % of the users draw n uniformly in [0.9 * 12,000, 12,000]
    assert cfg.max_history == 12_000 and int(np.ceil(0.9 * cfg.max_history)) > 10_000
    assert cfg.long_tail_fraction == 0.01 and cfg.mean_history == 1500
    # several interest clusters, a drifting recent pool, low-engagement distractors
    assert (cfg.num_long_interests, cfg.recent_pool_size, cfg.num_distractors) == (4, 4, 2)
    assert cfg.engage_distractor_mean < cfg.engage_base_mean < cfg.engage_interest_mean
    assert cfg.item_popularity_exponent == 1.5
    # users start over 3 years, sessions of ~50 behaviors (docs: the split by last time)
    assert (cfg.start_jitter_s, cfg.session_break_prob) == (94_608_000, 0.02)
    assert cfg.seed == 0  # the preset does not set the seed: --seed does
    # every other field keeps the generator default
    untouched = set(SyntheticConfig().to_dict()) - set(synthetic_presets.PRESETS["bench"])
    assert all(getattr(cfg, f) == getattr(SyntheticConfig(), f) for f in untouched)


def test_prepare_flags_override_the_preset(tmp_path):
    from beam_jobs import prepare
    assert prepare._synthetic_config(_prepare_args("--synthetic_preset", "bench")) == \
        synthetic_presets.preset_config("bench")
    cfg = prepare._synthetic_config(_prepare_args(
        "--synthetic_preset", "bench", "--synthetic_users", "40", "--seed", "3",
        "--synthetic_mean_history", "300", "--synthetic_max_history", "900"))
    assert (cfg.num_users, cfg.seed, cfg.mean_history, cfg.max_history) == (40, 3, 300, 900)
    assert cfg.num_impressions == 48 and cfg.num_distractors == 2  # the rest stays preset
    # a --synthetic_config file overrides the preset, the flags override the file
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"num_impressions": 8, "num_users": 77}))
    cfg = prepare._synthetic_config(_prepare_args(
        "--synthetic_preset", "bench", "--synthetic_config", str(path), "--synthetic_users", "5"))
    assert (cfg.num_impressions, cfg.num_users, cfg.mean_history) == (8, 5, 1500)
    # without a preset nothing changes (the generator defaults)
    assert prepare._synthetic_config(_prepare_args()) == SyntheticConfig()


def test_bad_preset_is_rejected_with_a_clear_message():
    from beam_jobs import prepare
    from tfmodels.errors import LifelongError
    with pytest.raises(LifelongError, match="unknown synthetic preset 'nope'; known presets: bench"):
        prepare._synthetic_config(_prepare_args("--synthetic_preset", "nope"))
    with pytest.raises(LifelongError, match="--synthetic_preset needs --source synthetic"):
        prepare._validate_args(_prepare_args("--synthetic_preset", "bench",
                                             "--source", "movielens"))


def test_the_preset_time_knobs_leave_the_history_draws_unchanged():
    """start_jitter_s and session_break_prob act at step 7 (timestamps): the behaviors
    drawn before it (items, categories, engagement) are unchanged. The impressions come
    after it and may shift: numpy's bounded-integer sampler can take one more word for
    another jitter bound (measured: 8 of 458 users of the preset)."""
    from beam_jobs import synthetic
    new = synthetic_presets.preset_config("bench", num_users=4, max_history=2000)
    old = synthetic_presets.preset_config("bench", num_users=4, max_history=2000,
                                          start_jitter_s=30 * 86400, session_break_prob=0.08)
    for u in range(4):
        a, b = synthetic._simulate(new, u), synthetic._simulate(old, u)
        for k in ("items", "cats", "engage"):
            np.testing.assert_array_equal(a[k], b[k])
        # fewer session breaks: a shorter history span for the same behaviors
        assert np.diff(a["ts"]).mean() < np.diff(b["ts"]).mean()


# ----------------------------------------------------------------------------- distractors


def test_distractors_are_frequent_low_engagement_and_never_clicked_more():
    # noise-free labels: P(click) = sigmoid(label_bias + bonus) exactly
    cfg = synthetic_presets.preset_config("bench", num_users=60, mean_history=600,
                                          max_history=1200, long_tail_fraction=0.0,
                                          label_noise_std=0.0, user_bias_std=0.0)
    share, eng, lab = [], [], {"dis": [], "long": []}
    for u in range(cfg.num_users):
        lat = user_latents(cfg, u)
        d = generate_user(cfg, u)
        cats = np.array([int(e[1][1:]) for e in d["events"]])
        engage = np.array([e[3] for e in d["events"]])
        is_dis = np.isin(cats, lat["distractors"])
        assert len(lat["distractors"]) == 2
        assert not set(lat["distractors"]) & set(lat["long_interests"] + lat["recent_pool"])
        share.append(is_dis[:-cfg.recent_window].mean())
        eng.extend(engage[is_dis])
        for _, c, _, y in d["impressions"]:
            c = int(c[1:])
            if c in lat["distractors"]:
                lab["dis"].append(y)
            elif c in lat["long_interests"] and c != lat["current_recent"]:
                lab["long"].append(y)
    # old part: distractor_share_old (0.2) + the uniform 25 % landing on 2 of 50 categories
    assert np.mean(share) == pytest.approx(0.2 + 0.25 * 2 / 50, abs=0.015)
    assert np.mean(eng) == pytest.approx(cfg.engage_distractor_mean, abs=0.01)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    assert np.mean(lab["dis"]) == pytest.approx(sig(cfg.label_bias), abs=0.03)  # 0.076
    assert np.mean(lab["long"]) == pytest.approx(
        sig(cfg.label_bias + cfg.label_long_weight), abs=0.04)                 # 0.731


@pytest.mark.parametrize("kwargs, match", [
    (dict(distractor_share_old=0.1), "num_distractors is 0"),
    (dict(num_distractors=2, long_share_old=0.5, recent_share_old=0.3,
          distractor_share_old=0.3), "distractor_share_old must be <= 1"),
    (dict(num_distractors=2, impression_long_frac=0.5, impression_recent_frac=0.3,
          impression_distractor_frac=0.3), "impression_distractor_frac must be <= 1"),
    (dict(num_categories=8, num_long_interests=3, recent_pool_size=3, num_distractors=2),
     "num_distractors"),
    (dict(num_distractors=-1), "num_distractors: must be >= 0"),
    (dict(num_distractors=1, engage_distractor_mean=0.0), "engage_distractor_mean"),
])
def test_bad_distractor_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)


# ----------------------------------------------------------------------------- oracle


def test_oracle_features_match_the_generated_strings():
    """Parity: the oracle's array statistics equal the same counts taken from
    generate_user's keys (last S, last L, full history)."""
    cfg = synthetic_presets.preset_config("bench", num_users=3, mean_history=300,
                                          max_history=600, long_tail_fraction=0.0)
    feats = synthetic_presets.oracle_features(cfg, range(3), {"s": 5, "l": 100, "f": None})
    row = 0
    for u in range(3):
        d = generate_user(cfg, u)
        for item, cate, _, label in d["impressions"]:
            for name, w in (("s", 5), ("l", 100), ("f", None)):
                ev = d["events"] if w is None else d["events"][-w:]
                cnt = sum(e[1] == cate for e in ev)
                esum = sum(e[3] for e in ev if e[1] == cate)
                icnt = sum(e[0] == item for e in ev)
                got = feats[name][row]
                assert got[0] == cnt and got[5] == icnt
                assert got[2] == pytest.approx(esum, abs=1e-9)
                assert got[4] == pytest.approx(esum / cnt if cnt else 0.0, abs=1e-9)
            assert feats["label"][row] == label and feats["user"][row] == u
            row += 1
    assert row == feats["label"].shape[0] == 3 * cfg.num_impressions


def test_full_history_oracle_beats_last_s_oracle_on_the_preset():
    """The bench preset at 200 users (9,600 impressions; half the users train, half
    test). Measured at seed 0: see the printed line and docs/synthetic.md."""
    cfg = synthetic_presets.preset_config("bench", num_users=200)
    feats = synthetic_presets.oracle_features(cfg, range(200), {"last_50": 50, "full": None})
    full = synthetic_presets.oracle_auc(feats, "full", "all")
    short = synthetic_presets.oracle_auc(feats, "last_50", "all")
    full_counts = synthetic_presets.oracle_auc(feats, "full", "counts")
    print(f"\nbench oracle (200 users): full {full:.4f}  last-50 {short:.4f}  "
          f"full counts only {full_counts:.4f}")
    assert full - short >= 0.12
    assert full >= 0.74 and short <= 0.64
    assert full - full_counts >= 0.06  # engagement matters: the distractors need it


def test_time_split_mirrors_prepare_user_split():
    """Users ordered by (last behavior ts, user_key string): first 0.8 train, last 0.1
    test. Users 2 and 10 tie on ts and order as strings ("u10" < "u2")."""
    last = {u: 1000 - u for u in range(11)}
    last[10] = last[2]
    users = np.repeat(np.arange(11), 2)                 # two impressions per user
    feats = {"user": users, "last_ts": np.array([last[u] for u in users])}
    train, test = synthetic_presets.time_split(feats, 0.8, 0.1)
    # order: 9, 8, 7, 6, 5, 4, 3, 10, 2, 1, 0 -> train = first int(0.8 * 11) = 8 users
    assert sorted(set(users[train])) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert sorted(set(users[test])) == [0, 1]          # after int(0.9 * 11) = 9 users
