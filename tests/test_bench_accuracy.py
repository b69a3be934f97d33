"""`lifelong bench accuracy` (lifelong/bench/accuracy.py), the paper-claim verdicts
(lifelong/reports/claims.py) and what each model reads (lifelong/reads.py)."""
import json
import math
import os

import pytest

from lifelong.bench import accuracy as A
from lifelong.reports import claims as CL

TINY = ["--short_len", "5", "--long_len", "24", "--emb_dim", "4", "--mlp_hidden", "8",
        "--din_hidden", "8,4", "--batch_size", "16", "--verbose", "0"]


# ---- claims: the verdict function on hand-made numbers --------------------------------------
def _stats(**models):
    return {m: {"mean": mean, "std": std, "n": n} for m, (mean, std, n) in models.items()}


def test_noise_margin_is_two_standard_errors_of_the_difference():
    # std 0.01 on both sides, 3 seeds each: 2 * sqrt(2 * 0.0001 / 3) = 0.0163299
    assert CL.noise_margin(0.01, 3, 0.01, 3) == pytest.approx(0.0163299, abs=1e-7)
    assert CL.noise_margin(0.02, 2, 0.0, 4) == pytest.approx(2 * math.sqrt(0.0004 / 2))
    assert CL.noise_margin(0.01, 1, 0.01, 3) is None          # one seed: no estimate


def test_relation_verdicts_on_hand_made_numbers():
    s = _stats(a=(0.70, 0.01, 3), b=(0.68, 0.01, 3), c=(0.69, 0.01, 3), one=(0.9, 0.0, 1))
    gt, sim = CL.GREATER, CL.SIMILAR
    v = CL.relation_verdict(CL.Relation("a", gt, "b"), s)    # diff 0.02 > 0.0163
    assert v["verdict"] == CL.HOLDS and v["diff"] == pytest.approx(0.02)
    assert v["margin"] == pytest.approx(0.0163299, abs=1e-7)
    assert CL.relation_verdict(CL.Relation("b", gt, "a"), s)["verdict"] == CL.FAILS
    assert CL.relation_verdict(CL.Relation("c", gt, "b"), s)["verdict"] == CL.NOISE  # 0.01
    assert CL.relation_verdict(CL.Relation("b", gt, "c"), s)["verdict"] == CL.NOISE  # -0.01
    assert CL.relation_verdict(CL.Relation("c", sim, "b"), s)["verdict"] == CL.HOLDS
    assert CL.relation_verdict(CL.Relation("a", sim, "b"), s)["verdict"] == CL.FAILS
    v = CL.relation_verdict(CL.Relation("a", gt, "one"), s)
    assert v["verdict"] == CL.UNTESTED and "fewer than 2 seeds" in v["why"]
    v = CL.relation_verdict(CL.Relation("a", gt, "missing"), s)
    assert v["verdict"] == CL.UNTESTED and "missing" in v["why"]
    undefined = _stats(a=(0.7, 0.01, 3), u=(None, None, 3))
    assert CL.relation_verdict(CL.Relation("a", gt, "u"), undefined)["verdict"] == CL.UNTESTED
    with pytest.raises(ValueError, match="op must be"):
        CL.Relation("a", "<", "b")


def test_claim_verdict_combines_its_relations():
    assert CL.combine([CL.HOLDS, CL.HOLDS, CL.UNTESTED]) == CL.HOLDS
    assert CL.combine([CL.HOLDS, CL.NOISE]) == CL.NOISE
    assert CL.combine([CL.NOISE, CL.FAILS, CL.HOLDS]) == CL.FAILS
    assert CL.combine([CL.UNTESTED, CL.UNTESTED]) == CL.UNTESTED
    twin_v2 = next(c for c in CL.CLAIMS if c.paper == "TWIN V2" and "Table 3" in c.source)
    assert [str(r) for r in twin_v2.relations][:2] == ["twin_v2 > twin", "twin > sim_soft"]
    # the paper's order with a clear gap everywhere: holds
    order = ["twin_v2", "twin", "sim_soft", "sdim", "eta", "sim_hard", "din", "avg_pool"]
    clear = _stats(**{m: (0.80 - 0.05 * i, 0.005, 3) for i, m in enumerate(order)})
    assert CL.check_claim(twin_v2, clear)["verdict"] == CL.HOLDS
    # TWIN above TWIN V2 by far more than the noise: does not hold
    swapped = dict(clear, twin=dict(clear["twin"], mean=0.9))
    r = CL.check_claim(twin_v2, swapped)
    assert r["verdict"] == CL.FAILS and r["relations"][0]["verdict"] == CL.FAILS
    # the top two 0.001 apart with std 0.005: within noise, the rest holds
    close = dict(clear, twin=dict(clear["twin"], mean=0.799))
    assert CL.check_claim(twin_v2, close)["verdict"] == CL.NOISE
    summary = {"din": {"auc": {"mean": 0.6, "std": 0.01}, "seeds": [0, 1, 2]},
               "din_l": {"auc": {"mean": 0.7, "std": 0.01, "seeds_defined": 2},
                         "seeds": [0, 1, 2]}}
    assert CL.stats_from_summary(summary) == {"din": {"mean": 0.6, "std": 0.01, "n": 3},
                                              "din_l": {"mean": 0.7, "std": 0.01, "n": 2}}
    text = CL.format_claims(CL.check_all(summary))
    assert "| LREA |" in text and "din_l > din: holds" in text     # 0.1 >> the margin


# ---- which models, what they read, the frontier, the docs section ----------------------------
def test_default_models_are_the_registered_non_ablations():
    from lifelong import model_configs
    root = model_configs.config_root(None)
    main = A.default_models(False, root)
    assert {"din", "din_l", "twin", "twin_v2", "lrea", "encode", "cformer", "lcn"} <= set(main)
    assert not {"cformer_sum", "lrea_count", "lrea_linear", "din_l_none", "lcn_k1_only",
                "twin_v2_no_ln_gsu"} & set(main)
    every = A.default_models(True, root)
    assert every[:len(main)] == main
    assert {"cformer_sum", "lrea_linear", "lrea_paper_train"} <= set(every)


def test_reads_says_which_side_features_each_model_sees():
    from lifelong.compare import format_table
    from lifelong.reads import model_reads, reads_cell
    from tfmodels.train import TrainConfig
    assert reads_cell(TrainConfig(model="din", short_len=50, long_len=300)) == "S 50"
    assert reads_cell(TrainConfig(model="din_l", short_len=50, long_len=300)) == "S 50 + L 300"
    assert reads_cell(TrainConfig(model="twin", long_len=300)) == \
        "S 50 + L 300 (gap, engage, domain)"
    assert reads_cell({**TrainConfig(model="twin", long_len=300).__dict__,
                       "long_module_config": {"cross_features": []}}) == "S 50 + L 300"
    assert reads_cell(TrainConfig(model="lcn", long_len=300, use_context=True)) == \
        "S 50 + L 300 (gap, engage) + hour"
    assert "long_cluster_size" in model_reads(TrainConfig(model="twin_v2"))["features"]
    summary = {"din": {k: {"mean": 0.5, "std": 0.0} for k in
                       ("auc", "gauc", "logloss", "train_examples_per_s")},
               }
    summary["din"].update(seeds=[0], stopped_epoch={"per_seed": [2]},
                          best_epoch={"per_seed": [1]})
    table = format_table(summary, "cmd", {"din": "S 50"})
    assert table.splitlines()[2].endswith("| seeds | reads |")
    assert table.splitlines()[4].endswith("| 1 | S 50 |")
    assert "reads" not in format_table(summary, "cmd")          # compare without: as before


def test_pareto_frontier_on_hand_made_points():
    pts = [("fast", 1.0, 0.60), ("slow_best", 10.0, 0.70), ("dominated", 5.0, 0.59),
           ("mid", 3.0, 0.65), ("tie_slower", 2.0, 0.60)]
    assert A.pareto(pts) == ["fast", "slow_best", "mid"]


def test_update_docs_replaces_only_its_marked_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    A.update_docs(str(doc), "movielens", "table one")
    A.update_docs(str(doc), "synthetic", "table two")
    A.update_docs(str(doc), "movielens", "table three")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert "table one" not in text and text.count("table three") == 1
    assert text.count("bench-accuracy:movielens begin") == 1 and "table two" in text
    assert text.index("table three") < text.index("table two")     # replaced in place


# ---- the command on a tiny dataset ----------------------------------------------------------
def test_bench_accuracy_end_to_end_and_resume(tmp_path, capsys):
    from lifelong import cli
    from tfmodels.testing import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "data"), num_users=30, seed=3)
    work, docs = str(tmp_path / "work"), tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    argv = ["bench", "accuracy", "--prepared", data, "--work_dir", work,
            "--models", "din,avg_pool", "--seeds", "0", "--config_dir", "none",
            "--epochs", "1", "--steps_per_epoch", "2", "--candidates", "10",
            "--rank_users", "3", "--rank_requests", "4", "--docs", str(docs), *TINY]
    assert cli.main(argv) == 0
    capsys.readouterr()
    md = open(os.path.join(work, "accuracy.md")).read()
    header = [ln for ln in md.splitlines() if ln.startswith("| model | AUC")][0]
    assert header.split("|")[1:-1] == [
        " model ", " AUC ", " GAUC ", " logloss ", " stop / best epoch ", " train ex/s ",
        " rank p50 ms (N=10) ", " rank / floor ", " cache bytes/user ", " reads ",
        " seeds "]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]]
            for ln in md.splitlines() if ln.startswith(("| din |", "| avg_pool |"))}
    assert rows["din"][9] == "S 5" and rows["avg_pool"][9] == "S 5 + L 24"
    for r in rows.values():
        # measured, not n/a: rank p50 ms, rank / its identity floor, cache bytes
        assert float(r[6].split()[0]) > 0 and float(r[7].rstrip("x")) > 0
        assert float(r[8].replace(",", "")) > 0
    res = json.load(open(os.path.join(work, "accuracy.json")))
    # avg_pool caches a [1, d] mean of 2 * emb_dim floats; DIN's entry is a header only
    assert res["serving"]["avg_pool"]["cache_bytes_per_user"] > \
        res["serving"]["din"]["cache_bytes_per_user"]
    for m in ("din", "avg_pool"):   # the floor timed beside rank, and the machine's load
        fig = res["serving"][m]
        assert fig["rank_over_floor"] == pytest.approx(fig["rank_p50_ms"] /
                                                       fig["floor_p50_ms"])
        assert fig["requests"] == 4 and fig["others_cpu_share"] is not None
    for png in ("accuracy-auc-vs-rank-latency.png", "accuracy-auc-vs-cache-bytes.png",
                "accuracy-learning-curves.png"):
        with open(os.path.join(work, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Paper claims against this table" in md
    claims = {c["paper"] + "|" + c["source"]: c for c in res["claims"]}
    twin_v2 = claims["TWIN V2|METHODS 2.4, Table 3"]
    din_avg = [r for r in twin_v2["relations"] if r["relation"] == "din > avg_pool"][0]
    assert din_avg["verdict"] == CL.UNTESTED and "fewer than 2 seeds" in din_avg["why"]
    assert "bench-accuracy:tiny begin" in docs.read_text() and "| avg_pool |" in docs.read_text()
    # resumable: the same command retrains nothing and re-measures nothing
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("reusing finished run") == 2
    assert err.count("reusing serving figures") == 2


def test_bench_accuracy_refuses_bad_input_in_one_line(tmp_path, capsys):
    from lifelong import cli
    assert cli.main(["bench", "accuracy", "--prepared", str(tmp_path / "nope"),
                     "--work_dir", str(tmp_path / "w")]) == 2
    assert "--prepared" in capsys.readouterr().err
    from tfmodels.testing import write_tiny_dataset
    data = write_tiny_dataset(str(tmp_path / "data"), num_users=4)
    assert cli.main(["bench", "accuracy", "--prepared", data, "--models", "din,nope",
                     "--work_dir", str(tmp_path / "w"), "--config_dir", "none"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "accuracy", "--prepared", data, "--seeds", "0,x",
                     "--work_dir", str(tmp_path / "w"), "--config_dir", "none"]) == 2
    assert "--seeds must be comma separated integers" in capsys.readouterr().err


def test_table_without_serving_figures_says_n_a(tmp_path):
    agg = {k: {"mean": 0.61, "std": 0.002} for k in
           ("auc", "gauc", "logloss", "train_examples_per_s")}
    agg.update(seeds=[0, 1], stopped_epoch={"per_seed": [4, 5]},
               best_epoch={"per_seed": [2, 3]})
    table = A.format_table({"din_l": agg}, {}, {"din_l": "S 50 + L 300"}, 100)
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells == ["din_l", "0.6100 ± 0.0020", "0.6100 ± 0.0020", "0.6100 ± 0.0020",
                     "4/2, 5/3", "1", "n/a", "n/a", "n/a", "S 50 + L 300", "2"]
    # figures of a busy machine are marked; the ratio to the floor is shown as measured
    fig = {"rank_p50_ms": 21.4, "rank_over_floor": 1.62, "cache_bytes_per_user": 1112.0,
           "others_cpu_share": A.BUSY_OTHERS_CPU_SHARE + 0.01}
    cells = [c.strip() for c in A.format_table({"din_l": agg}, {"din_l": fig}, {}, 100)
             .splitlines()[2].split("|")[1:-1]]
    assert cells[6:9] == ["21.40 (busy)", "1.62x", "1,112"]
    fig["others_cpu_share"] = A.BUSY_OTHERS_CPU_SHARE - 0.01
    cells = [c.strip() for c in A.format_table({"din_l": agg}, {"din_l": fig}, {}, 100)
             .splitlines()[2].split("|")[1:-1]]
    assert cells[6] == "21.40"
    assert "rank p50 ms (N=100)" in table.splitlines()[0]
    assert A.plot_frontier({"din_l": agg}, {"din_l": None}, str(tmp_path / "x.png"),
                           "x", "t") is None
    assert not (tmp_path / "x.png").exists()


def test_server_start_waits_while_versions_load(tmp_path):
    """The bench's wait for its server: the limit is on time without progress, so a
    start that keeps loading versions for longer than the limit is still waited for;
    a silent one fails naming the stall, and an exited one its exit code."""
    import subprocess
    import sys
    from lifelong.bench.serving import wait_until_listening

    def fake(script):
        log = tmp_path / f"log{len(list(tmp_path.iterdir()))}.txt"
        proc = subprocess.Popen([sys.executable, "-c", script],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        return proc, str(log)

    # five versions 0.4 s apart (2 s in all) under a 1 s stall limit, then it listens
    proc, log = fake("import time\nfor i in range(5):\n"
                     "    print(f'[serve] loaded m{i} version 1 in 0.4s', flush=True)\n"
                     "    time.sleep(0.4)\n"
                     "print('[serve] listening on localhost:1234; 5 models', flush=True)\n"
                     "time.sleep(5)")
    try:
        assert wait_until_listening(proc, log, stall_s=1.0) == "localhost:1234"
    finally:
        proc.kill()
    proc, log = fake("import time\nprint('[serve] loaded m0 version 1', flush=True)\n"
                     "time.sleep(30)")
    with pytest.raises(RuntimeError, match=r"no progress for 0.5 s after 1 loaded version"):
        wait_until_listening(proc, log, stall_s=0.5)
    proc.wait(timeout=10)
    proc, log = fake("import sys; sys.exit(3)")
    proc.wait(timeout=10)
    with pytest.raises(RuntimeError, match="server exited with 3"):
        wait_until_listening(proc, log, stall_s=5)


def test_time_left_uses_each_models_recorded_training_time():
    rows = [{"model": "din", "train_wall_s": 100.0}, {"model": "din", "train_wall_s": 300.0},
            {"model": "cformer", "train_wall_s": 1000.0}, {"model": "sdim"}]
    # din at its mean 200, cformer at 1000, twin (none finished) at the mean of all 3 runs
    assert A.estimate_left_s(rows, ["din", "cformer", "twin"]) == pytest.approx(
        200 + 1000 + 1400 / 3)
    assert A.estimate_left_s([{"model": "din", "train_wall_s": None}], ["din"]) is None
