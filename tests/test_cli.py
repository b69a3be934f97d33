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
                                     "lrea-grid", "encode-report", "replay",
                                     "lcn-consistency"])
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


def test_train_evaluate_resume(tiny_data, tmp_path, capsys):
    """train in a fresh process (the console entry point as a user runs it), resume it
    in-process, then `lifelong evaluate` in a fresh process: its stderr holds only the
    CLI's own lines (TensorFlow's start-up lines are silenced), the count labelled `done:`."""
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
    # 1e-6, not bit equality: `lifelong train` runs TensorFlow's oneDNN kernels
    # (tfmodels._env.prefer_onednn_for_training), this test process TF's default ones, so
    # the same weights give a logloss a few 1e-9 apart
    for k in ("auc", "gauc", "logloss"):
        assert metrics[k] == pytest.approx(again[k], abs=1e-6), k
        assert f"{k:>15}: {metrics[k]:.4f}" in r.stdout.splitlines()
    assert os.path.isdir(os.path.join(out, "tb"))
    # resume: continue the same run to epoch 2 from its checkpoint
    capsys.readouterr()
    assert cli.main(["train", "--data", tiny_data, "--model", "din_l", "--out_dir", out,
                     "--epochs", "2", "--resume", "--no_eval", *TINY]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at epoch 1" in err
    run2 = json.load(open(os.path.join(out, "run.json")))
    # only epoch 2 ran in this call; run.json's history covers the whole run (epochs.jsonl)
    assert run2["resumed_at_epoch"] == 1 and run2["history_epochs"] == [1, 2]
    assert run2["history"]["total_loss"][0] == run["history"]["total_loss"][0]
    assert len(run2["history"]["total_loss"]) == len(run2["train_examples_per_s"]) == 2
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-m", "lifelong.cli", "evaluate", "--run", out,
                        "--split", "valid"], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("[evaluate] ") for line in lines), lines
    valid = json.load(open(os.path.join(out, "metrics-valid.json")))
    assert f"[evaluate] done: {valid['samples']} examples scored" in lines


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
    from beam_jobs.cluster_algo import ClusterError
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


# ---- the registry drives the CLI's report commands and compare's data routing -------------
def test_report_commands_come_from_the_registry(monkeypatch, capsys):
    """A report command exists because a registry entry declares it: a fake entry's
    report shows up in `lifelong --help` and runs its module (with its ALLOW_EXTRA);
    an lrea entry without its declaration leaves no `lrea-grid` command."""
    import types
    from tfmodels import registry
    calls = []
    fake = types.ModuleType("lifelong.reports.fake_report")
    fake.ALLOW_EXTRA = True
    fake.add_arguments = lambda p: p.add_argument("--x", type=int, required=True)
    fake.run = lambda args, extra: calls.append((args.x, list(extra))) or 0
    monkeypatch.setitem(sys.modules, "lifelong.reports.fake_report", fake)
    report = registry.Report("fake-report", "a report the fake method brings")
    monkeypatch.setitem(registry.MODELS, "fake_method", registry.Method(
        "tfmodels.methods.din_long:DinLong", reports=(report,)))
    assert registry.reports()["fake-report"] == (report, ["fake_method"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "fake-report" in out and "a report the fake method brings" in out
    assert cli.main(["fake-report", "--x", "3", "--beam_flag=1"]) == 0
    assert calls == [(3, ["--beam_flag=1"])]
    # the CLI names no method: without lrea's declaration there is no lrea-grid
    monkeypatch.setitem(registry.MODELS, "lrea", "tfmodels.methods.lrea:LREA")
    assert "lrea-grid" not in cli.module_commands()
    with pytest.raises(SystemExit) as e:
        cli.main(["lrea-grid", "--help"])
    assert e.value.code == 2 and "invalid choice: 'lrea-grid'" in capsys.readouterr().err
    # a report may not shadow a built-in command
    monkeypatch.setitem(registry.MODELS, "fake_method", registry.Method(
        "tfmodels.methods.din_long:DinLong", reports=(registry.Report("train", "x"),)))
    with pytest.raises(ValueError, match="clashes"):
        cli.module_commands()


def test_compare_routes_by_the_registry_needs(tmp_path, monkeypatch, capsys):
    """compare's dataset per model follows the registry's `needs`, not method names: a
    fake entry needing a clustered history goes to --clustered, twin_v2 without the
    declaration goes to the raw data, and a need compare cannot meet is refused with
    the registry's own description of how to make it."""
    from lifelong import compare
    from tfmodels import registry
    raw, clu = tmp_path / "raw", tmp_path / "clu"
    raw.mkdir()
    clu.mkdir()
    (raw / "meta.json").write_text(json.dumps({"source": "synthetic"}))
    (clu / "meta.json").write_text(json.dumps({"source": "synthetic", "clustering": {}}))
    monkeypatch.setitem(registry.MODELS, "fake_clustered", registry.Method(
        "tfmodels.methods.din_long:DinLong", needs=(registry.CLUSTERED_HISTORY,)))
    monkeypatch.setitem(registry.MODELS, "twin_v2", "tfmodels.methods.twin_v2:TwinV2")
    assert registry.needing(registry.CLUSTERED_HISTORY) == [
        "twin_v2_no_ln_gsu", "twin_v2_no_ln_esu", "fake_clustered"]
    got = compare.data_for_models(["din", "twin_v2", "fake_clustered"], str(raw), str(clu))
    assert got == {"din": str(raw), "twin_v2": str(raw), "fake_clustered": str(clu)}
    monkeypatch.setitem(registry.INPUTS, "cross_domain", "a cross-domain dataset: run X")
    monkeypatch.setitem(registry.MODELS, "fake_cross", registry.Method(
        "tfmodels.methods.din_long:DinLong", needs=("cross_domain",)))
    with pytest.raises(ValueError, match="model 'fake_cross' needs a cross-domain dataset: "
                                         "run X, which `lifelong compare` cannot pass yet"):
        compare.data_for_models(["fake_cross"], str(raw), str(clu))
    # the --clustered help lists the models the registry says need clusters
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "(twin_v2_no_ln_gsu, twin_v2_no_ln_esu, fake_clustered)" in \
        " ".join(capsys.readouterr().out.split())


def test_registry_declarations_match_the_modules():
    """Every module class that says it reads a clustered history
    (``needs_clustered_data``) has the need declared in each of its registry entries,
    and every declared input and report is well formed."""
    from tfmodels import registry
    for name in registry.names():
        cls = registry.long_module_class(name)
        if getattr(cls, "needs_clustered_data", False):
            assert registry.CLUSTERED_HISTORY in registry.needs(name), name
        assert set(registry.needs(name)) <= set(registry.INPUTS), name
    assert {c: m for c, (_, m) in registry.reports().items()} == {
        "lrea-grid": ["lrea"], "encode-report": ["encode"], "cluster-quality": ["cformer"],
        "lcn-consistency": ["lcn"]}
    for command in registry.reports():
        module = cli.report_module(command)
        assert os.path.exists(os.path.join(os.path.dirname(cli.__file__), "reports",
                                           module.rsplit(".", 1)[1] + ".py")), module


# ---- a CLI that starts fast and speaks clearly ----------------------------------------------
#: every `lifelong` command (and bench kind) whose parser the help test builds
ALL_COMMANDS = [["prepare"], ["train"], ["evaluate"], ["compare"], ["bench"],
                ["bench", "serving"], ["bench", "precompute"], ["bench", "accuracy"],
                ["export"], ["precompute"],
                ["serve"], ["cluster"], ["cluster-bench"], ["replay"], ["staleness"], ["claims"],
                ["lrea-grid"],
                ["encode-report"], ["cluster-quality"], ["lcn-consistency"]]


def test_every_command_help_loads_no_tensorflow():
    """`lifelong --help` and `lifelong <cmd> --help` build their parsers without importing
    TensorFlow (a fresh interpreter; timing-free). The command list is the parser's own,
    so a new command is covered too."""
    code = ("import sys, contextlib, io\n"
            "from lifelong import cli\n"
            f"commands = {ALL_COMMANDS!r}\n"
            "import argparse\n"
            "listed = set(next(a for a in cli.build_parser(False)._actions\n"
            "                  if isinstance(a, argparse._SubParsersAction)).choices)\n"
            "assert listed == {c[0] for c in commands}, sorted(listed ^ {c[0] for c in commands})\n"
            "bad = []\n"
            "for argv in [[]] + commands:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            cli.main(argv + ['--help'])\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, (argv, e.code)\n"
            "    assert 'usage: lifelong' in out.getvalue(), argv\n"
            "    if 'tensorflow' in sys.modules:\n"
            "        bad.append(argv)\n"
            "        del sys.modules['tensorflow']\n"
            "print('loaded tensorflow:', bad)\n"
            "sys.exit(1 if bad else 0)\n")
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)          # as a user's shell
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stderr == ""                            # nothing but the help on the terminal


def _fake_tensorflow(tmp_path, body):
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return str(tmp_path / "fake")


@pytest.mark.parametrize("verbose,user_level,shown,level", [
    (False, None, False, "3"), (True, None, True, "0"), (False, "1", True, "1")])
def test_tensorflow_startup_lines_are_silenced_unless_verbose(tmp_path, verbose, user_level,
                                                              shown, level):
    """C++ start-up lines written to fd 2 while `tensorflow` loads (here a stand-in
    package that writes one) are hidden by default, shown with --verbose, and a
    TF_CPP_MIN_LOG_LEVEL the user set is kept (and then nothing is hidden)."""
    path = _fake_tensorflow(tmp_path, "import os\nos.write(2, b'C++ start-up noise\\n')\n")
    code = ("import os, sys\nfrom lifelong import quiet\n"
            f"quiet.configure({verbose})\n"
            "import tensorflow\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
            "os.write(2, b'after the import\\n')\n")
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.getcwd())
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if user_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level
    assert ("C++ start-up noise" in r.stderr) == shown
    assert "after the import" in r.stderr          # fd 2 is back after the import


def test_a_failing_tensorflow_import_still_shows_its_error(tmp_path):
    path = _fake_tensorflow(tmp_path, "import os\nos.write(2, b'noise\\n')\n"
                                      "raise ImportError('libfoo.so: cannot open')\n")
    code = "from lifelong import quiet\nquiet.configure(False)\nimport tensorflow\n"
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.getcwd())
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and "noise" not in r.stderr
    assert "ImportError: libfoo.so: cannot open" in r.stderr


def test_evaluate_speaks_progress_and_a_final_count(tiny_data, tmp_path, capsys):
    """Progress lines say they are progress, the last count is labelled `done:` (the
    fresh-process evaluate, whose stderr holds only such lines, is checked in
    test_train_evaluate_resume)."""
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", tiny_data, "--model", "din", "--out_dir", out,
                     "--epochs", "1", "--no_eval", *TINY]) == 0
    from tfmodels import train as T
    cfg, model = T.load_run(out)
    capsys.readouterr()
    T.predict(model, T.dataset(cfg, "test", training=False), progress_every=2)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" so far")[0] for line in err] == [
        "[evaluate] progress: 32 examples scored", "[evaluate] progress: 64 examples scored",
        "[evaluate] progress: 96 examples scored", "[evaluate] done: 96 examples scored"]


# ---- leftover user errors: one line, exit 2, nothing created -----------------------------------
def test_bad_list_flags_of_benches_and_grid_are_one_line(tiny_data, tmp_path, capsys):
    cases = [
        (["bench", "storage", "--data", tiny_data, "--long_lens", "100,x"],
         "--long_lens must be comma separated integers, got '100,x'"),
        (["bench", "train", "--data", tiny_data, "--long_lens", ""], "--long_lens is empty"),
        (["bench", "serving", "--candidates", "1,ten", "--out", str(tmp_path / "b1")],
         "--candidates must be comma separated integers, got '1,ten'"),
        (["bench", "precompute", "--mlp_hidden", "32;16", "--out", str(tmp_path / "b2")],
         "--mlp_hidden must be comma separated integers, got '32;16'"),
        (["lrea-grid", "--prepared", tiny_data, "--ranks", "32,x", "--work_dir",
          str(tmp_path / "g")], "--ranks must be comma separated ints, got '32,x'"),
        (["lrea-grid", "--prepared", tiny_data, "--design", "paper", "--anchor_rank", "0",
          "--work_dir", str(tmp_path / "g")], "anchors must be r > 0"),
        (["lrea-grid", "--prepared", tiny_data, "--baselines", "nope", "--work_dir",
          str(tmp_path / "g")], "unknown model 'nope'"),
        (["lrea-grid", "--prepared", tiny_data, "--long_module_config", "{rank: 4}",
          "--work_dir", str(tmp_path / "g")], "--long_module_config is not valid JSON"),
    ]
    for argv, reason in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"lifelong {argv[0]}: error: ") and reason in err[-1], err
        assert not any(line.startswith("Traceback") for line in err)
    assert not any(os.path.exists(tmp_path / d) for d in ("b1", "b2", "g"))


def test_lrea_grid_tables_print_undefined_metrics_as_n_a():
    """A grid cell or the reference whose metric is undefined for every seed (mean None,
    lifelong.compare.summarize) prints `n/a (<reason>)`, not a TypeError."""
    from lifelong.reports import lrea_grid as G
    undefined = {"mean": None, "std": None, "undefined": "no group has both labels"}
    summary = {G.cell_name(32, 0.3): {"auc": {"mean": 0.71234, "std": 0.001},
                                      "gauc": undefined},
               G.cell_name(64, 0.3): {"auc": undefined},
               "din_l": {"auc": {"mean": 0.7125, "std": 0.0}, "seeds": [0]}}
    text = G.format_matrix(summary, [32, 64], [0.3], "gauc")
    assert text.splitlines()[-2:] == ["| 32 | n/a (no group has both labels) |", "| 64 | – |"]
    assert "| 64 | n/a (no group has both labels) |" in G.format_matrix(summary, [32, 64], [0.3])
    rows = G.format_vs_reference(summary, [(32, 0.3), (64, 0.3)]).splitlines()
    assert rows[-2:] == ["| r=32 lam=0.3 | 0.7123 ± 0.0010 | -0.0002 | yes |",
                         "| r=64 lam=0.3 | n/a (no group has both labels) | n/a | n/a |"]
    summary["din_l"]["auc"] = undefined
    assert "minus din_l (n/a (no group has both labels), 1 seeds)" in \
        G.format_vs_reference(summary, [(32, 0.3)])


def test_compare_summary_is_mean_and_sample_std():
    """Three seeds' AUCs 0.6 / 0.7 / 0.8: mean 0.7 and sample std (ddof=1) 0.1 (the
    population std would be 0.0816); one seed has std 0."""
    from lifelong.compare import summarize
    rows = [{"model": "m", "seed": s, "auc": a} for s, a in enumerate((0.6, 0.7, 0.8))]
    agg = summarize(rows + [{"model": "one", "seed": 0, "auc": 0.5}])
    assert agg["m"]["auc"]["mean"] == pytest.approx(0.7)
    assert agg["m"]["auc"]["std"] == pytest.approx(0.1)
    assert agg["one"]["auc"] == {"mean": 0.5, "std": 0.0}
