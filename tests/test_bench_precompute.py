"""`lifelong bench precompute` flags and table (the runs themselves: docs/benchmarks.md)."""
from lifelong import cli
from lifelong.bench import precompute as BP


def test_bad_engine_is_one_line_before_any_folder(tmp_path, capsys):
    out = tmp_path / "b"
    assert cli.main(["bench", "precompute", "--precompute_engines", "batched,fast",
                     "--out", str(out)]) == 2
    assert "--precompute_engines must be a comma separated subset" in capsys.readouterr().err
    assert not out.exists()


def test_table_ratio_and_overhead_columns(capsys):
    row = dict(model="m", L=10, users=1001, startup_s=2.0, record_bytes_per_user=10.0,
               store_bytes_per_user=8, cache_tensors={"c": [1, 2]})
    res = {"rows": [dict(row, engine="runinference", steady_users_per_s=100.0,
                         steady_cpu_ms_per_user=5.0, tower_cpu_ms_per_user=2.0),
                    dict(row, engine="batched", steady_users_per_s=250.0,
                         steady_cpu_ms_per_user=2.5, tower_cpu_ms_per_user=2.0)]}
    BP.print_precompute(res, "cmd")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| m |")]
    assert lines[0].split(" | ")[3:5] == ["100", "1.00x"]
    assert lines[1].split(" | ")[3:5] == ["250", "2.50x"]
    assert lines[1].split(" | ")[6:9] == ["2.50", "2.00", "0.50"]   # steady, tower, other
