"""`lifelong claims`: the papers' claims over several `bench accuracy` tables."""
import json
import math

import pytest

from lifelong import cli
from lifelong.reports import claims as C
from lifelong.reports import claims_tables as T

# a page as docs/benchmarks.md holds it: an unrelated table, a heading, the bench table
PAGE = """# Benchmarks

| model | rank p50 ms | seeds |
|---|---|---|
| din | 4.82 | 3 |

## Run A

| model | AUC | GAUC | logloss | seeds |
|---|---|---|---|---|
| din | 0.6000 ± 0.0100 | 0.61 ± 0.01 | 0.69 ± 0.01 | 3 |
| din_l | 0.6500 ± 0.0100 | 0.62 ± 0.01 | 0.68 ± 0.01 | 3 |
| sdim | n/a | n/a | n/a | 0 |

## Run B

| model | AUC | seeds |
|---|---|---|
| din | 0.5000 ± 0.0200 | 2 |
"""


def test_markdown_tables_are_read_per_section():
    # the first table has no AUC column: ignored; n/a rows are skipped; both bench
    # tables are read in page order, so din comes from the later one
    every = T.stats_from_markdown(PAGE)
    assert every == {"din": {"mean": 0.5, "std": 0.02, "n": 2},
                     "din_l": {"mean": 0.65, "std": 0.01, "n": 3}}
    run_a = T.stats_from_markdown(PAGE, section="## Run A")
    assert run_a == {"din": {"mean": 0.6, "std": 0.01, "n": 3},
                     "din_l": {"mean": 0.65, "std": 0.01, "n": 3}}
    assert T.stats_from_markdown(PAGE, metric="gauc", section="## Run A")["din"]["mean"] == 0.61
    # only the first bench table after the section line: the page's first table has no
    # AUC column, so Run A's is read and Run B's (further down) is not
    assert T.stats_from_markdown(PAGE, section="# Benchmarks") == run_a
    with pytest.raises(T.ClaimsInputError, match="no line contains it"):
        T.stats_from_markdown(PAGE, section="## Run C")


def test_merge_takes_the_last_input_and_says_so():
    stats, source, notes = T.merge([("a.md", {"din": {"mean": 0.6, "std": 0.0, "n": 3},
                                              "lrea": {"mean": 0.7, "std": 0.0, "n": 3}}),
                                    ("b.json", {"din": {"mean": 0.5, "std": 0.0, "n": 3}})])
    assert stats["din"]["mean"] == 0.5 and source == {"din": "b.json", "lrea": "a.md"}
    assert notes == ["din: taken from b.json (also in a.md)"]


def _relation(results, paper, relation):
    return next(x for r in results if r["paper"] == paper for x in r["relations"]
                if x["relation"] == relation)


def test_relations_across_inputs_are_tested(tmp_path, capsys):
    # din_l from a Markdown page, din from an accuracy.json: LREA's "din_l > din" relation
    # spans both inputs and gets the hand-computed verdict
    md = tmp_path / "page.md"
    md.write_text(PAGE)
    summary = {"din": {"seeds": [0, 1, 2], "auc": {"mean": 0.62, "std": 0.01}},
               "twin": {"seeds": [0, 1], "auc": {"mean": None, "std": None,
                                                  "undefined": "no value"}}}
    js = tmp_path / "accuracy.json"
    js.write_text(json.dumps({"summary": summary}))
    out = tmp_path / "claims.md"
    png = tmp_path / "auc.png"
    assert cli.main(["claims", str(md), str(js), "--section", "## Run A",
                     "--out", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats, _, _ = T.merge([(str(md), T.stats_from_file(str(md), section="## Run A")),
                           (str(js), T.stats_from_file(str(js)))])
    assert "twin" not in stats                       # undefined metric: not a row
    results = [C.check_claim(c, stats) for c in C.CLAIMS]
    rel = _relation(results, "LREA", "din_l > din")
    margin = 2 * math.sqrt(0.01 ** 2 / 3 + 0.01 ** 2 / 3)       # 0.01633
    assert rel["diff"] == pytest.approx(0.03) and rel["margin"] == pytest.approx(margin)
    assert rel["verdict"] == C.HOLDS
    text = out.read_text()
    assert text.startswith(f"command: lifelong claims {md} {js} --section '## Run A' "
                           f"--plot {png}\n")
    assert "din_l > din: holds (diff +0.0300, noise ±0.0163)" in text
    assert f"din: taken from {js} (also in {md})" in text
    assert "| din_l | 0.6500 | 0.0100 | 3 |" in capsys.readouterr().out


def test_relations_at_the_rounding_boundary_are_flagged():
    stats = {"lrea": {"mean": 0.6213, "std": 0.0097, "n": 3},
             "din_l": {"mean": 0.6340, "std": 0.0051, "n": 3}}
    results = [C.check_claim(c, stats) for c in C.CLAIMS]
    rel = _relation(results, "LREA", "lrea ≈ din_l")
    assert abs(abs(rel["diff"]) - rel["margin"]) < T.ROUNDING_TOLERANCE
    assert T.near_boundary(results) == [f"LREA: lrea ≈ din_l ({rel['why']})"]
    report = T.format_report(stats, {"lrea": "a.md", "din_l": "a.md"}, [], results, "auc")
    assert "At the boundary" in report
    # the same figures from an accuracy.json (unrounded) are not flagged
    report = T.format_report(stats, {"lrea": "a.json", "din_l": "a.json"}, [], results, "auc")
    assert "At the boundary" not in report


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path, capsys):
    empty = tmp_path / "notes.md"
    empty.write_text("# nothing\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert cli.main(["claims", str(empty)]) == 2
    assert "no per-model table found" in capsys.readouterr().err
    bad = tmp_path / "accuracy.json"
    bad.write_text("{}")
    assert cli.main(["claims", str(bad)]) == 2
    assert "not a `bench accuracy` accuracy.json" in capsys.readouterr().err
    assert cli.main(["claims", str(tmp_path / "missing.md")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_plot_orders_models_best_first(tmp_path):
    stats = {"din": {"mean": 0.60, "std": 0.01, "n": 3},
             "twin": {"mean": 0.74, "std": 0.01, "n": 3},
             "lrea": {"mean": 0.62, "std": 0.02, "n": 2}}
    source = {"din": "a.md", "twin": "a.md", "lrea": "b.json"}
    assert T.plot(stats, source, str(tmp_path / "p.png")) == ["twin", "lrea", "din"]
    assert (tmp_path / "p.png").stat().st_size > 0
