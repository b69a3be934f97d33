"""Per-model configs (issue 22.1, lifelong/model_configs.py, docs/configs.md) and the
learning curves / stopping epochs of ``lifelong compare`` (issue 22.4).

Fast: config resolution only, plus one tiny compare (2 models x 1 seed, 2 steps x 2
epochs) for what compare writes."""
import dataclasses
import json
import os

import pytest

from lifelong import cli
from lifelong import compare as C
from lifelong import model_configs as MC
from tests.test_cli import TINY

# `lifelong compare` of the comparison that ran while this landed (notes/cmp3.sh):
# its finished runs were recorded by the code before config files existed
JOB_MODELS = ("din,avg_pool,din_l,din_l_none,cformer,cformer_sum,lrea,lrea_count,"
              "twin,sim_hard,sim_soft,eta,sdim").split(",")
JOB_FLAGS = {"movielens": ["--long_len", "300", "--epochs", "2", "--steps_per_epoch", "150"],
             "synthetic": ["--long_len", "1000", "--epochs", "2", "--batch_size", "128",
                           "--learning_rate", "0.002"]}


def _before(args, **overrides):
    """``lifelong.cli._train_config`` as it was before per-model configs (commit
    d266a6c), kept verbatim as the reference of "exactly today's behaviour"."""
    from tfmodels.train import TrainConfig, load_config_file
    d = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in list(cli.TRAIN_FLAGS) + ["use_user_embedding", "use_context",
                                         "head_batchnorm", "cross_domain", "data"]:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in cli.LIST_FLAGS:
            value = [int(x) for x in str(value).split(",") if x.strip()]
        if name == "long_module_config":
            value = json.loads(value)
        d[name] = value
    d.update(overrides)
    return TrainConfig.from_dict(d)


def _args(*argv, command="train"):
    args, _ = cli.build_parser(False, command=command).parse_known_args([command, *argv])
    return args


def _dataset(tmp_path, source):
    """A folder whose meta.json names ``source`` (all config lookup reads of a dataset)."""
    d = tmp_path / f"data-{source}"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text(json.dumps({"source": source}))
    return str(d)


def _write(root, rel, obj):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _cfg(args, **overrides):
    return dataclasses.asdict(cli._train_config(args, **overrides))


# ---- exactly today's behaviour without a config file ---------------------------------------
def test_no_config_file_resolves_exactly_as_before(tmp_path, tiny_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    file_cfg = tmp_path / "c.json"
    file_cfg.write_text(json.dumps({"epochs": 5, "emb_dim": 6, "model": "din_l",
                                    "long_module_config": {"din_normalize": "none"}}))
    cases = [
        ("train", ["--data", tiny_data], {}),
        ("train", ["--data", tiny_data, "--model", "cformer", *TINY,
                   "--long_module_config", '{"num_clusters": 3}'], {}),
        ("train", ["--data", tiny_data, "--config", str(file_cfg), "--epochs", "1"], {}),
        ("compare", ["--prepared", tiny_data, *TINY, "--epochs", "2"],
         {"data": tiny_data, "model": "lrea_count", "seed": 2, "out_dir": "w/runs/x-s2"}),
    ]
    for command, argv, overrides in cases:
        reference = dataclasses.asdict(_before(_args(*argv, command=command), **overrides))
        for config_dir in (str(empty), "none"):
            got = _cfg(_args(*argv, "--config_dir", config_dir, command=command), **overrides)
            assert got == reference, (argv, config_dir)


def test_shipped_default_configs_restate_the_builtin_values(tiny_data):
    """configs/default/ is the fallback of any dataset without a folder (the tiny test
    data's source is 'tiny'): for every registered model it resolves to exactly the
    config the code gave before files existed."""
    from tfmodels import registry
    for model in registry.MODELS:
        argv = ["--data", tiny_data, "--model", model]
        assert _cfg(_args(*argv)) == dataclasses.asdict(_before(_args(*argv))), model


@pytest.mark.parametrize("source", ["movielens", "synthetic"])
def test_running_comparison_keeps_its_finished_runs(tmp_path, source):
    """With the shipped configs/<source>/ files, every model of the comparison that was
    running when they landed resolves (its flags given) to the config it recorded, so
    `compare --resume` reuses its finished runs; the same holds for a config recorded
    before TrainConfig gained its cross-domain / CRP fields."""
    data = _dataset(tmp_path, source)
    argv = ["--prepared", data, *JOB_FLAGS[source], "--resume", "--work_dir", "w"]
    args = _args(*argv, command="compare")
    for model in JOB_MODELS:
        over = {"data": data, "model": model, "seed": 1, "out_dir": f"w/runs/{model}-s1"}
        cfg = cli._train_config(args, **over)
        recorded = dataclasses.asdict(_before(args, **over))
        assert dataclasses.asdict(cfg) == recorded, model
        assert MC.load(model, source, MC.CONFIG_DIR).files, model     # a file was read
        older = {k: v for k, v in recorded.items()
                 if k not in ("cross_domain", "crp_weight", "crp_negatives", "crp_tau")}
        assert C._same_training(older, C._config_dict(cfg))
        assert not C._same_training(older, {**C._config_dict(cfg), "crp_weight": 0.1})
        assert not C._same_training(recorded, {**C._config_dict(cfg), "epochs": 3})
        # speed-only fields never force a retrain (same function, tested equal elsewhere)
        fast = {**C._config_dict(cfg), "din_path": "per_candidate", "jit_compile": "on",
                "input_pipeline": "legacy"}
        assert C._same_training(recorded, fast)
        assert C._same_training({**recorded, "din_path": "rows"}, C._config_dict(cfg))
        assert not C._same_training(recorded, {**fast, "learning_rate": 0.123})


# ---- precedence ----------------------------------------------------------------------------
def test_precedence_set_over_flag_over_config_over_model_file(tmp_path, tiny_data):
    root = tmp_path / "configs"
    _write(root, "default/cformer.json", {"epochs": 99, "optimizer": "adagrad"})
    model_file = _write(root, "tiny/cformer.json", {
        "_comment": "a comment", "epochs": 7, "learning_rate": 0.01, "batch_size": 32,
        "emb_dim": 8, "long_module_config": {"num_clusters": 6, "alpha": 0.5,
                                             "encoder_layers": 2}})
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"learning_rate": 0.02, "emb_dim": 12,
                                    "long_module_config": {"alpha": 0.6}}))
    base = ["--data", tiny_data, "--model", "cformer", "--config_dir", str(root)]
    got = _cfg(_args(*base))
    # the dataset folder beats default/; encoder_layers 2 restates CFormer's default
    assert (got["epochs"], got["optimizer"], got["learning_rate"], got["batch_size"]) == \
        (7, "adam", 0.01, 32)
    assert got["long_module_config"] == {"num_clusters": 6, "alpha": 0.5}
    got = _cfg(_args(*base, "--config", str(cfg_file), "--emb_dim", "4", "--batch_size", "64",
                     "--long_module_config", '{"beta": 2.0}',
                     "--set", "cformer.batch_size=16",
                     "--set", "cformer.long_module_config.num_clusters=3"))
    assert (got["epochs"], got["learning_rate"], got["emb_dim"], got["batch_size"]) == \
        (7, 0.02, 4, 16)       # file < --config < flag < --set
    assert got["long_module_config"] == {"num_clusters": 3, "alpha": 0.6, "beta": 2.0}
    assert MC.load("cformer", "tiny", str(root)).files == [model_file]
    # another dataset falls back to default/
    assert MC.load("cformer", "movielens", str(root)).fields == {"epochs": 99,
                                                                  "optimizer": "adagrad"}


def test_set_reaches_only_its_model_where_one_flag_crashed(tmp_path, tiny_data):
    """Before: one --long_module_config for every model, so a C-Former key reached DIN-L,
    whose constructor raises TypeError (mid-comparison, after other models trained)."""
    from tfmodels import schema as S
    from tfmodels.model import build_model
    fs = S.FeatureSchema.from_data_dir(tiny_data, 5, 24)
    with pytest.raises(TypeError):
        build_model(fs, "din_l", emb_dim=4, long_module_config={"num_clusters": 3})
    args = _args("--prepared", tiny_data, "--models", "din_l,cformer", *TINY,
                 "--set", "cformer.long_module_config.num_clusters=3", command="compare")
    assert _cfg(args, model="din_l", data=tiny_data)["long_module_config"] == {}
    assert _cfg(args, model="cformer", data=tiny_data)["long_module_config"] == \
        {"num_clusters": 3}
    # the global flag now fails before training, naming the model and the key
    args = _args("--prepared", tiny_data, "--long_module_config", '{"num_clusters": 3}',
                 command="compare")
    with pytest.raises(MC.ModelConfigError,
                       match=r"'long_module_config.num_clusters' is not a parameter of 'din_l'"):
        cli._train_config(args, model="din_l", data=tiny_data)


# ---- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ({"lr": 0.1}, r"tiny/din_l.json: unknown field 'lr'; known fields: batch_size"),
    ({"seed": 3}, r"tiny/din_l.json: field 'seed' is set per run"),
    ({"epochs": "10"}, r"tiny/din_l.json: field 'epochs' must be an integer, got '10'"),
    ({"mlp_hidden": "64,32"}, r"tiny/din_l.json: field 'mlp_hidden' must be a list of integers"),
    ({"long_module_config": {"num_clusters": 3}},
     r"tiny/din_l.json: field 'long_module_config.num_clusters' is not a parameter of 'din_l'"),
    ({"base": "nope"}, r"tiny/din_l.json: field 'base': 'nope' is neither a registered model"),
    ({"base": "din_l"}, r"base chain loops: din_l -> din_l"),
])
def test_bad_model_file_is_one_line_naming_file_and_field(tmp_path, tiny_data, capsys,
                                                           content, message):
    root = tmp_path / "configs"
    _write(root, "tiny/din_l.json", content)
    with pytest.raises(MC.ModelConfigError, match=message):
        MC.load("din_l", "tiny", str(root))
    work = tmp_path / "cmp"
    assert cli.main(["compare", "--prepared", tiny_data, "--models", "din,din_l", "--seeds",
                     "0", "--work_dir", str(work), "--config_dir", str(root), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lifelong compare: error: ") and "tiny/din_l.json" in err[-1]
    assert not (work / "runs").exists()          # refused before anything trained


def test_unknown_model_and_bad_set_refused(tmp_path, tiny_data, capsys):
    root = tmp_path / "configs"
    _write(root, "default/notes.json", {"epochs": 2})       # a file that names no model
    assert cli.main(["train", "--data", tiny_data, "--model", "nope", "--config_dir",
                     str(root)]) == 2
    assert "error: unknown model 'nope' (no config file nope.json in" in capsys.readouterr().err
    with pytest.raises(MC.ModelConfigError, match=r"notes.json: names no registered model"):
        MC.load("notes", "tiny", str(root))
    for argv, message in [
            (["--set", "din.lr=1"], "--set din.lr: unknown field 'lr'"),
            (["--set", "din_l.epochs=2"], "'din_l' is not among --models (din)"),
            (["--set", "din.epochs"], "expected NAME.FIELD=VALUE"),
            (["--set", "din.epochs=two"], "field 'epochs' must be an integer, got 'two'")]:
        assert cli.main(["compare", "--prepared", tiny_data, "--models", "din",
                         "--work_dir", str(tmp_path / "w"), *argv]) == 2
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "w").exists()
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"base": "din_l"}))
    with pytest.raises(MC.ModelConfigError, match="'base' works in files under the configs"):
        cli._train_config(_args("--data", tiny_data, "--config", str(bad)))


# ---- ablations are configs -----------------------------------------------------------------
def test_ablation_files_extend_their_base_and_keep_the_preset(tmp_path):
    root = tmp_path / "configs"
    _write(root, "default/cformer_sum.json", {"base": "cformer"})
    _write(root, "default/cformer_wo_orth.json", {"base": "cformer"})
    _write(root, "default/lrea_linear.json", {"base": "lrea"})
    _write(root, "default/cformer_j6.json", {"base": "cformer",
                                             "long_module_config": {"num_clusters": 6}})
    _write(root, "tiny/cformer.json", {"epochs": 5, "long_module_config": {
        "centroid_norm": "sum", "num_clusters": 12}})
    _write(root, "tiny/lrea.json", {"long_module_config": {"phi": "leaky_relu", "rank": 8}})
    mc = MC.load("cformer_sum", "tiny", str(root))
    # centroid_norm 'sum' is cformer_sum's preset anyway; the base's J and epochs carry over
    assert (mc.model, mc.fields) == ("cformer_sum", {"epochs": 5, "long_module_config": {
        "num_clusters": 12}})
    # a key the preset sets keeps the preset's value, whatever the base's file says
    _write(root, "default/lcn_k1_only.json", {"base": "lcn"})
    _write(root, "tiny/lcn.json", {"long_module_config": {"k1": 100, "k2": 20}})
    assert MC.load("lcn_k1_only", "tiny", str(root)).fields == {
        "long_module_config": {"k2": 20}}
    mc = MC.load("cformer_wo_orth", "tiny", str(root))     # its preset says nothing of it
    assert mc.fields["long_module_config"] == {"centroid_norm": "sum", "num_clusters": 12}
    # lrea's file restates LREA's phi: not applied to LREALinear (phi linear by default)
    assert MC.load("lrea_linear", "tiny", str(root)).fields == {
        "long_module_config": {"rank": 8}}
    # a config-only name trains its base's registered model
    mc = MC.load("cformer_j6", "tiny", str(root))
    assert (mc.model, mc.fields["long_module_config"]) == ("cformer", {"num_clusters": 6,
                                                                      "centroid_norm": "sum"})
    MC.check_names(["cformer_j6", "din"], _args("--config_dir", str(root), command="compare"))


def test_every_registered_model_resolves_in_every_shipped_folder():
    from tfmodels import registry
    folders = sorted(os.listdir(MC.CONFIG_DIR))
    assert {"default", "movielens", "synthetic"} <= set(folders)
    for folder in folders:
        for name in sorted(set(registry.MODELS) | set(MC.config_names(MC.CONFIG_DIR))):
            mc = MC.load(name, folder, MC.CONFIG_DIR)
            assert mc.model in registry.MODELS
    assert MC.load("lrea_paper_train", "movielens", MC.CONFIG_DIR).fields["optimizer"] == \
        "adagrad"


# ---- what compare writes -------------------------------------------------------------------
def test_learning_curve_epochs_after_a_resume(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"history": {"auc": [0.6, 0.7],
                                                          "val_auc": [0.55, 0.5]},
                                              "stopped_epoch": 5}))
    curves = C.learning_curves([{"model": "m", "run_dir": str(run)},
                                {"model": "m", "run_dir": str(tmp_path / "missing")}])
    assert curves == {"m": {"auc": {4: [0.6], 5: [0.7]}, "val_auc": {4: [0.55], 5: [0.5]}}}
    # a run.json with history_epochs (epochs.jsonl: the whole run) is numbered by them
    (run / "run.json").write_text(json.dumps({"history": {"auc": [0.6, 0.7, 0.8]},
                                              "history_epochs": [1, 2, 3],
                                              "stopped_epoch": 3}))
    assert C.learning_curves([{"model": "m", "run_dir": str(run)}]) == {
        "m": {"auc": {1: [0.6], 2: [0.7], 3: [0.8]}}}
    assert C.plot_learning_curves([], str(tmp_path / "x.png"), "t") is None
    assert not (tmp_path / "x.png").exists()


def test_compare_records_resolved_configs_curves_and_stopping_epochs(tmp_path, tiny_data,
                                                                      capsys):
    root = tmp_path / "configs"
    _write(root, "tiny/din_l.json", {"learning_rate": 0.005})
    work = tmp_path / "cmp"
    # sim_soft: the cheapest model with a nested long_module_config field to --set
    argv = ["compare", "--prepared", tiny_data, "--models", "din_l,sim_soft", "--seeds", "0",
            "--work_dir", str(work), "--epochs", "2", "--steps_per_epoch", "2",
            "--config_dir", str(root), "--set", "sim_soft.long_module_config.top_k=3",
            *TINY]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    res = json.load(open(work / "results.json"))
    mcs = res["model_configs"]
    assert mcs["din_l"]["files"] == [str(root / "tiny" / "din_l.json")]
    assert mcs["din_l"]["resolved"]["learning_rate"] == 0.005
    assert mcs["sim_soft"]["files"] == [] and mcs["sim_soft"]["resolved"]["learning_rate"] == 0.001
    assert mcs["din_l"]["resolved"]["long_module_config"] == {}
    assert mcs["sim_soft"]["resolved"]["long_module_config"] == {"top_k": 3}
    for row in res["rows"]:
        run = json.load(open(os.path.join(row["run_dir"], "run.json")))
        resolved = {k: v for k, v in run["config"].items() if k not in ("out_dir", "seed")}
        assert resolved == mcs[row["model"]]["resolved"]
        assert (row["stopped_epoch"], row["best_epoch"]) == (run["stopped_epoch"],
                                                             run["best_epoch"])
        line = next(x for x in out.splitlines() if x.startswith(f"| {row['model']} |"))
        assert f"| {run['stopped_epoch']}/{run['best_epoch']} | 1 |" in line
    png = work / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: unchanged configs are reused (run.json untouched, the same table), a changed
    # per-model override is a new run (was tests/test_cli.py's compare-resume test)
    stamp = os.path.getmtime(work / "runs" / "din_l-s0" / "run.json")
    assert cli.main(argv + ["--resume"]) == 0
    assert capsys.readouterr().err.count("reusing finished run") == 2
    assert os.path.getmtime(work / "runs" / "din_l-s0" / "run.json") == stamp
    again = json.load(open(work / "results.json"))
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in res["rows"]]
    argv[argv.index("sim_soft.long_module_config.top_k=3")] = \
        "sim_soft.long_module_config.top_k=2"
    assert cli.main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "reusing finished run" in err and err.count("reusing finished run") == 1
    assert json.load(open(work / "runs" / "sim_soft-s0" / "run.json"))["config"][
        "long_module_config"] == {"top_k": 2}


def test_train_reads_the_model_file_and_says_so(tmp_path, tiny_data, capsys):
    root = tmp_path / "configs"
    path = _write(root, "tiny/din_l.json", {"learning_rate": 0.004, "epochs": 1})
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", tiny_data, "--model", "din_l", "--out_dir", out,
                     "--config_dir", str(root), "--steps_per_epoch", "1", "--no_eval",
                     *TINY]) == 0
    assert f"[train] config of din_l: {path}" in capsys.readouterr().err
    config = json.load(open(os.path.join(out, "run.json")))["config"]
    assert (config["learning_rate"], config["epochs"], config["batch_size"]) == (0.004, 1, 16)
