"""The `lifelong` console entry point: help, one-line errors, train/evaluate/resume on tiny data."""
import json
import os
import subprocess
import sys

import pytest

from lifelong import cli

TINY = ["--short_len", "5", "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
        "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "compare", "bench",
                                     "cluster", "cluster-bench", "cluster-quality",
                                     "lrea-grid"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: lifelong " + command in capsys.readouterr().out


def test_bad_arguments_give_one_line_and_exit_2(tiny_data, capsys):
    assert cli.main(["train", "--data", "/nonexistent", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lifelong train: error:") and "not a prepared dataset" in err[-1]
    assert cli.main(["train", "--data", tiny_data, "--model", "nope", *TINY]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "--data", tiny_data, "--mlp_hidden", "a,b"]) == 2
    assert "comma separated integers" in capsys.readouterr().err
    assert cli.main(["train", "--data", tiny_data, "--epochs", "0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    assert cli.main(["evaluate", "--run", "/nonexistent"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--bogus_flag"])
    assert e.value.code == 2


def test_config_file_and_flags(tmp_path, tiny_data):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"epochs": 5, "emb_dim": 6, "model": "din_l"}))
    args, _ = cli.build_parser(False).parse_known_args(
        ["train", "--data", tiny_data, "--config", str(cfg_path), "--epochs", "1"])
    cfg = cli._train_config(args)
    assert (cfg.epochs, cfg.emb_dim, cfg.model) == (1, 6, "din_l")   # flag beats file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epoch": 2}))
    args, _ = cli.build_parser(False).parse_known_args(["train", "--config", str(bad)])
    with pytest.raises(ValueError, match="unknown config keys"):
        cli._train_config(args)


def test_train_evaluate_resume(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    r = run_cli("train", "--data", tiny_data, "--model", "din_l", "--out_dir", out,
                "--epochs", "1", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "auc" in r.stdout and "gauc" in r.stdout and "logloss" in r.stdout
    run = json.load(open(os.path.join(out, "run.json")))
    for key in ("config", "seed", "versions", "git_commit", "history", "train_examples_per_s"):
        assert key in run
    assert run["versions"]["tensorflow"].startswith("2.21")
    metrics = json.load(open(os.path.join(out, "metrics-test.json")))
    # the CLI's printed and written metrics are those of evaluate() on the same run
    from tfmodels import train as T
    again = T.evaluate(out, "test")
    assert metrics["samples"] == again["samples"] == 96     # 24 tiny users x 4 impressions
    for k in ("auc", "gauc", "logloss"):
        assert metrics[k] == pytest.approx(again[k], abs=1e-9), k
        assert f"{k:>15}: {metrics[k]:.4f}" in r.stdout.splitlines()
    assert os.path.isdir(os.path.join(out, "tb"))
    # resume: continue the same run to epoch 2 from its checkpoint
    r = run_cli("train", "--data", tiny_data, "--model", "din_l", "--out_dir", out,
                "--epochs", "2", "--resume", "--no_eval", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "at epoch 1" in r.stderr
    run2 = json.load(open(os.path.join(out, "run.json")))
    assert len(run2["history"]["total_loss"]) == 1      # only epoch 2 ran
    r = run_cli("evaluate", "--run", out, "--split", "valid")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "metrics-valid.json"))


def test_compare_resume_reuses_finished_runs(tiny_data, tmp_path, capsys):
    work = str(tmp_path / "cmp")
    base = ["compare", "--prepared", tiny_data, "--models", "din,avg_pool", "--seeds", "0",
            "--work_dir", work, "--epochs", "1", *TINY]
    assert cli.main(base) == 0
    first = json.load(open(os.path.join(work, "results.json")))
    stamp = os.path.getmtime(os.path.join(work, "runs", "din-s0", "run.json"))
    capsys.readouterr()
    assert cli.main(base + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing finished run") == 2
    assert os.path.getmtime(os.path.join(work, "runs", "din-s0", "run.json")) == stamp
    again = json.load(open(os.path.join(work, "results.json")))
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in first["rows"]]
    # a changed config is trained afresh, not reused
    assert cli.main(base + ["--epochs", "2", "--resume", "--models", "din"]) == 0
    assert "reusing" not in capsys.readouterr().err
    assert json.load(open(os.path.join(work, "runs", "din-s0", "run.json")))[
        "config"]["epochs"] == 2


def test_compare_routes_twin_v2_to_the_clustered_dataset(tmp_path):
    """One compare call covers raw baselines and TWIN V2: cluster-aware models train on
    --clustered, the others on --prepared; a TWIN V2 without clusters is refused."""
    from lifelong import compare
    raw, clu = tmp_path / "raw", tmp_path / "clu"
    raw.mkdir()
    clu.mkdir()
    (raw / "meta.json").write_text(json.dumps({"source": "synthetic"}))
    (clu / "meta.json").write_text(json.dumps({"source": "synthetic", "clustering": {}}))
    got = compare.data_for_models(["din", "twin", "twin_v2", "twin_v2_no_ln_gsu"], str(raw),
                                  str(clu))
    assert got == {"din": str(raw), "twin": str(raw), "twin_v2": str(clu),
                   "twin_v2_no_ln_gsu": str(clu)}
    # --prepared itself clustered: every model on it
    assert set(compare.data_for_models(["twin_v2", "din"], str(clu), None).values()) == {str(clu)}
    with pytest.raises(ValueError, match="needs a clustered history"):
        compare.data_for_models(["din", "twin_v2"], str(raw), None)
    with pytest.raises(ValueError, match="not a `lifelong cluster` output"):
        compare.data_for_models(["twin_v2"], str(raw), str(raw))


# ---- user errors (one line, exit 2) vs bugs (traceback) -------------------------------------
@pytest.mark.parametrize("exc", [TypeError("boom"), KeyError("boom"), ValueError("boom"),
                                 FileNotFoundError("boom")])
def test_programming_errors_keep_their_traceback(exc, monkeypatch, capsys):
    def broken(args, extra):
        raise exc
    monkeypatch.setattr(cli, "cmd_evaluate", broken)
    with pytest.raises(type(exc)):
        cli.main(["evaluate", "--run", "x"])
    assert "error:" not in capsys.readouterr().err


def test_programming_error_exits_1_with_a_traceback():
    code = ("import sys\nfrom lifelong import cli\n"
            "def broken(args, extra):\n    return {}['no such key']\n"
            "cli.cmd_evaluate = broken\nsys.exit(cli.main(['evaluate', '--run', 'x']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "KeyError: 'no such key'" in r.stderr
    assert "lifelong evaluate: error:" not in r.stderr


def test_package_errors_give_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from tfmodels.train import ConfigError

    def bad(args, extra):
        raise ConfigError("bad thing: fix it\nsecond line")
    monkeypatch.setattr(cli, "cmd_evaluate", bad)
    assert cli.main(["evaluate", "--run", "x"]) == 2
    assert capsys.readouterr().err == "lifelong evaluate: error: bad thing: fix it\n"
    for argv in (["--debug", "evaluate", "--run", "x"], ["evaluate", "--run", "x", "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)")
        assert "ConfigError: bad thing" in err
        assert err.endswith("lifelong evaluate: error: bad thing: fix it\n")


def test_error_classes_derive_from_lifelong_error_and_keep_their_builtin():
    from beam_jobs.cluster import ClusterError
    from beam_jobs.precompute import PrecomputeError
    from beam_jobs.prepare import PrepareError
    from serving.export import ExportError
    from lifelong.replay import ReplayError
    from tfmodels._env import KerasLineError
    from tfmodels.errors import LifelongError, MissingInputError, UsageError
    from tfmodels.registry import UnknownModelError
    from tfmodels.train import ConfigError
    for cls, builtin in ((cli.CliError, Exception), (ConfigError, ValueError),
                         (UnknownModelError, KeyError), (PrepareError, ValueError),
                         (ClusterError, ValueError), (PrecomputeError, ValueError),
                         (ReplayError, ValueError), (ExportError, ValueError),
                         (KerasLineError, RuntimeError), (UsageError, ValueError),
                         (MissingInputError, FileNotFoundError)):
        assert issubclass(cls, LifelongError) and issubclass(cls, builtin), cls
    assert str(UnknownModelError("unknown model 'x'")) == "unknown model 'x'"


def test_user_mistakes_in_compare_and_prepare_stay_one_line(tmp_path, capsys):
    for argv, reason in (
            (["compare", "--prepared", str(tmp_path / "nope"), "--models", "din"],
             "is not a prepared dataset"),
            (["compare", "--data", str(tmp_path / "nope.csv"), "--models", "din",
              "--work_dir", str(tmp_path / "w")], "does not exist"),
            (["compare", "--seeds", "a", "--models", "din"], "--seeds must be comma separated"),
            (["prepare", "--output", str(tmp_path / "o"), "--valid_time_window", "5,2"],
             "is after END")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"lifelong {argv[0]}: error:") and reason in err[-1], err
        assert not any(line.startswith("Traceback") for line in err)
    assert not os.path.exists(tmp_path / "w")   # refused before creating the work folder


# ---- metrics that are undefined or meaningless -------------------------------------------------
def test_compare_single_label_users_and_tiny_split(tmp_path, capsys):
    """One impression per user: no user holds both labels, so GAUC is undefined, and a
    24-impression test split is too small: the table says n/a, a warning names the
    counts, and metrics-test.json / results.json are strict JSON."""
    from tfmodels import schema as S
    from tfmodels.testing import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "data"), impressions_per_user=1, seed=4)
    labels = []
    import tensorflow as tf
    for f in sorted(tf.io.gfile.glob(S.split_pattern(data, "test"))):
        for raw in tf.data.TFRecordDataset(f, compression_type="GZIP"):
            ex = tf.train.Example.FromString(raw.numpy())
            labels += list(ex.features.feature["imp_label"].float_list.value)
    n, pos = len(labels), int(sum(labels))
    assert n == 24
    work = str(tmp_path / "cmp")
    assert cli.main(["compare", "--prepared", data, "--models", "avg_pool", "--seeds", "0",
                     "--work_dir", work, "--epochs", "1", "--steps_per_epoch", "1", *TINY]) == 0
    cap = capsys.readouterr()
    assert "n/a (no group has both labels)" in cap.out and "nan" not in cap.out.lower()
    warning = (f"warning: the test split holds only {n} impressions ({pos} positive, "
               f"{n - pos} negative)")
    assert warning in cap.err and warning in cap.out

    def strict(path):
        def reject(name):
            raise AssertionError(f"{path}: non-strict JSON constant {name}")
        with open(path) as f:
            return json.load(f, parse_constant=reject)
    res = strict(os.path.join(work, "results.json"))
    row = res["rows"][0]
    assert row["gauc"] is None and row["gauc_undefined"] == "no group has both labels"
    assert res["summary"]["avg_pool"]["gauc"] == {"mean": None, "std": None,
                                                  "undefined": "no group has both labels"}
    assert res["warnings"] and res["warnings"][0].startswith(warning)
    metrics = strict(os.path.join(work, "runs", "avg_pool-s0", "metrics-test.json"))
    assert metrics["gauc"] is None and (metrics["samples"], metrics["positives"]) == (n, pos)
    assert cli.main(["evaluate", "--run", os.path.join(work, "runs", "avg_pool-s0")]) == 0
    cap = capsys.readouterr()
    assert "           gauc: n/a (no group has both labels)" in cap.out.splitlines()
    assert warning in cap.err
