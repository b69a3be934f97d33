"""The `lifelong` console entry point: help, one-line errors, train/evaluate/resume on tiny data."""
import json
import os
import subprocess
import sys

import pytest

from tfmodels import cli

TINY = ["--short_len", "5", "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
        "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tfmodels.cli", *args], capture_output=True,
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
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["samples"] > 0
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
    from tfmodels import compare
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
