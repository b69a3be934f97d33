"""Sample building: raw logs -> per-user records (history once + labeled impressions).

The ``prepare`` subcommand. One Apache Beam pipeline reads a source (MovieLens
``ratings.csv`` + ``movies.csv``, Taobao ``UserBehavior.csv``, the Taobao display-ad
files of Tianchi 56 (:mod:`beam_jobs.prepare_taobao_ad`), or the seeded
synthetic generator), parses every row with :mod:`beam_jobs.adapters` (malformed
rows become dead letters, never crashes), builds dense vocabularies, applies a
sample protocol (METHODS section 4) and writes

* ``<output>/{train,valid,test}-SSSSS-of-NNNNN.tfrecord.gz`` — one
  :func:`tfmodels.schema.encode_user_record` per user and split,
* ``<output>/vocab/{items,categories,users}.tsv`` — ``dense_id<TAB>raw_key<TAB>count``,
* ``<output>/dead_letter/rows-*.tsv`` — ``reason<TAB>raw line``,
* ``<output>/meta.json`` — vocab sizes, statistics, row accounting, arguments.

See ``docs/data.md`` for formats, protocols and how to run on Dataflow/Flink/Spark.

Modules
-------
* this one, the driver: flags, input checks, run, ``meta.json``;
* :mod:`beam_jobs.prepare_pipeline`: the graph (:func:`build_pipeline`);
* :mod:`beam_jobs.prepare_transforms`: its DoFns and :class:`ExactCuts`;
* :mod:`beam_jobs.prepare_protocols`: the per-user protocols (pure functions);
* :mod:`beam_jobs.prepare_vocab`: item / category / user vocabularies;
* :mod:`beam_jobs.prepare_report`: the summed counts -> the report;
* :mod:`beam_jobs.sharded_io`: shards, text files and counts (shared with ``cluster``).

Design notes
------------
* Every DoFn is a pure function of its element and side inputs (no process
  state), so the same pipeline runs on any runner by pipeline options alone.
* Global steps are combiners + side inputs: vocabularies (a list collected by a
  combiner, ordered by descending count then key), exact time/user quantile cuts
  (:class:`~beam_jobs.prepare_transforms.ExactCuts`, two passes: an hourly
  histogram, then the elements of the one or two hours that hold a cut), and one
  report dictionary.
* The report is not read from Beam metrics (those are also emitted, namespace
  ``prepare``, and cross-checked when the runner reports them) but from a small
  ``_counts.json`` written by the pipeline itself, which works the same on every
  runner and running mode.
* Per-user logic lives in pure functions (:mod:`beam_jobs.prepare_protocols`:
  ``per_event_user``, ``last_item_user``, ``labeled_user``) that the DoFns wrap,
  so the protocols are unit-testable without Beam.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import adapters as A
from beam_jobs import beam_main
from beam_jobs import flags
from beam_jobs.prepare_pipeline import COUNTS_FILE, DEAD_LETTER_DIR, VOCAB_DIR, build_pipeline
from beam_jobs.prepare_report import build_report
from beam_jobs.prepare_transforms import NAMESPACE
from beam_jobs.sharded_io import (TFRECORD_SUFFIX, join, match_paths, query_counters,
                                  read_text_file, split_files)
from tfmodels import schema as S
from tfmodels.errors import LifelongError

SOURCES = ("synthetic", "movielens", "taobao", "taobao_ad")
PROTOCOLS = ("per_event_time_split", "last_item_per_user", "labeled_impressions",
             "labeled_impressions_time_split")
DEFAULT_PROTOCOL = {"movielens": "per_event_time_split", "taobao": "last_item_per_user",
                    "synthetic": "labeled_impressions",
                    "taobao_ad": "labeled_impressions_time_split"}


# Compact records (--record_format compact): engagement quantisation step per source, a
# power of two. Exact for MovieLens half-star ratings and Taobao behavior codes; the
# synthetic engagement is a continuous Beta draw in [0, 1]: step 1/16, |error| <= 1/32
# [interp: the issue leaves the step open; 1/16 keeps ~4 bits, the generator's means
# 0.15 / 0.35 / 0.6 stay 2+ steps apart].
DEFAULT_ENGAGE_STEP = {"movielens": 0.5, "taobao": 1.0, "taobao_ad": 1.0,
                       "synthetic": 1.0 / 16}


class PrepareError(ValueError, LifelongError):
    """Bad arguments or unusable input; the message is one line for the CLI."""


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


# ======================================================================================
# Arguments
# ======================================================================================


# The flags live in beam_jobs/flags.py (no Beam, no TensorFlow there): `lifelong prepare
# --help` is fast.
add_arguments = flags.add_prepare_arguments

def _validate_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Check the arguments; returns the resolved settings. Raises PrepareError."""
    source = getattr(args, "source", "synthetic")
    if source not in SOURCES:
        raise PrepareError(f"unknown --source {source!r}; expected one of {', '.join(SOURCES)}")
    protocol = getattr(args, "protocol", None) or DEFAULT_PROTOCOL[source]
    if protocol not in PROTOCOLS:
        raise PrepareError(f"unknown --protocol {protocol!r}; expected one of "
                           f"{', '.join(PROTOCOLS)}")
    if protocol == "labeled_impressions" and source != "synthetic":
        raise PrepareError(f"--protocol labeled_impressions needs a source with explicit "
                           f"impressions (synthetic), not {source}")
    if (protocol == "labeled_impressions_time_split") != (source == "taobao_ad"):
        raise PrepareError(f"--source taobao_ad goes with --protocol "
                           f"labeled_impressions_time_split only (its impressions split by "
                           f"day), got --source {source} --protocol {protocol}")
    ml_domains = getattr(args, "movielens_domains", "none") or "none"
    if ml_domains not in A.MOVIELENS_DOMAIN_MODES:
        raise PrepareError(f"unknown --movielens_domains {ml_domains!r}; expected one of "
                           f"{', '.join(A.MOVIELENS_DOMAIN_MODES)}")
    if ml_domains != "none" and (source != "movielens" or protocol != "per_event_time_split"):
        raise PrepareError(f"--movielens_domains {ml_domains} needs --source movielens with "
                           f"--protocol per_event_time_split, got {source} / {protocol}")
    syn_domains = getattr(args, "synthetic_domains", None)
    if syn_domains is not None and (source != "synthetic" or int(syn_domains) not in (1, 2)):
        raise PrepareError(f"--synthetic_domains must be 1 or 2 with --source synthetic, got "
                           f"{syn_domains} with --source {source}")
    if getattr(args, "synthetic_preset", None) and source != "synthetic":
        raise PrepareError(f"--synthetic_preset needs --source synthetic, got --source {source}")
    cuts = None
    if source == "taobao_ad":
        try:
            cuts = A.taobao_ad_cuts(getattr(args, "taobao_ad_valid", "last_day"))
        except ValueError as e:
            raise PrepareError(str(e)) from None
    if not getattr(args, "output", None):
        raise PrepareError("--output is required")
    num_shards = int(getattr(args, "num_shards", 4))
    if num_shards < 1:
        raise PrepareError(f"--num_shards must be >= 1, got {num_shards}")
    if int(getattr(args, "min_item_count", 1)) < 1:
        raise PrepareError(f"--min_item_count must be >= 1, got {args.min_item_count}")
    if int(getattr(args, "max_history", 0)) < 0:
        raise PrepareError(f"--max_history must be >= 0, got {args.max_history}")
    tf_ = float(getattr(args, "train_fraction", 0.8))
    vf = float(getattr(args, "valid_fraction", 0.1))
    if not (math.isfinite(tf_) and math.isfinite(vf)) or not 0.0 < tf_ <= 1.0 or vf < 0.0:
        raise PrepareError(f"need 0 < --train_fraction <= 1 and --valid_fraction >= 0, "
                           f"got {tf_} and {vf}")
    if protocol == "per_event_time_split":
        if vf >= tf_:
            raise PrepareError(f"per_event_time_split carves validation from the end of the "
                               f"training period: need --valid_fraction ({vf}) < "
                               f"--train_fraction ({tf_})")
        fractions = (tf_ - vf, tf_)
    else:
        if tf_ + vf > 1.0 + 1e-9:
            raise PrepareError(f"need --train_fraction + --valid_fraction <= 1, got {tf_} + {vf}")
        fractions = (tf_, min(1.0, tf_ + vf))
    if not math.isfinite(float(getattr(args, "label_threshold", 4.0))):
        raise PrepareError("--label_threshold must be finite")
    keep = None
    if source in ("taobao", "taobao_ad"):
        try:
            keep = A.parse_keep_behaviors(getattr(args, "taobao_keep_behaviors", "pv,cart,fav,buy"))
        except ValueError as e:
            raise PrepareError(str(e)) from None
    window = None  # None: the source's default, resolved by _resolve_time_window
    spec = getattr(args, "valid_time_window", None)
    if spec is not None and spec.strip().lower() != "default":
        try:
            window = A.parse_time_window(spec)
        except ValueError as e:
            raise PrepareError(str(e)) from None
    record_format = getattr(args, "record_format", "full") or "full"
    if record_format not in S.RECORD_FORMATS:
        raise PrepareError(f"unknown --record_format {record_format!r}; expected one of "
                           f"{', '.join(S.RECORD_FORMATS)}")
    step = getattr(args, "engage_step", None)
    if step is None:
        step = DEFAULT_ENGAGE_STEP[source]
    elif record_format not in ("compact", "compact2"):
        raise PrepareError("--engage_step applies to --record_format compact only (or compact2)")
    try:
        step = S.check_engage_step(step)
    except ValueError as e:
        raise PrepareError(f"--engage_step: {e}") from None
    ts_step = getattr(args, "ts_step", None)
    if ts_step is not None and record_format != "compact2":
        raise PrepareError("--ts_step applies to --record_format compact2 only")
    try:
        ts_step = S.check_ts_step(1 if ts_step is None else ts_step)
    except ValueError as e:
        raise PrepareError(f"--ts_step: {e}") from None
    return {"source": source, "protocol": protocol, "num_shards": num_shards,
            "record_format": record_format, "engage_step": step, "ts_step": ts_step,
            "fractions": fractions, "keep": keep, "time_window": window,
            "movielens_domains": ml_domains, "cuts": cuts,
            "time_window_from": "--valid_time_window" if window is not None else
            f"the {source} default"}


def _resolve_time_window(settings: Dict[str, Any], synthetic_config=None) -> None:
    """Fill ``settings["time_window"]`` with the source's default window when the flag
    did not give one (the synthetic default needs the generator's config)."""
    if settings.get("time_window") is None:
        settings["time_window"] = A.default_time_window(
            settings["source"], synthetic_config=(synthetic_config.to_dict()
                                                  if synthetic_config is not None else None))


def _synthetic_config(args: argparse.Namespace):
    from beam_jobs import synthetic  # lazy: only the synthetic source needs it
    base: Dict[str, Any] = {}
    path = getattr(args, "synthetic_config", None)
    if path:
        if not FileSystems.exists(path):
            raise PrepareError(f"--synthetic_config {path!r} does not exist")
        try:
            with FileSystems.open(path) as f:
                base = json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PrepareError(f"--synthetic_config {path!r} is not valid JSON: {e}") from None
        if not isinstance(base, dict):
            raise PrepareError(f"--synthetic_config {path!r} must hold a JSON object")
    preset = getattr(args, "synthetic_preset", None)
    if preset:  # lowest precedence: the JSON file's fields, then the flags, override it
        from beam_jobs import synthetic_presets
        try:
            base = {**synthetic_presets.preset_dict(preset), **base}
        except ValueError as e:
            raise PrepareError(f"--synthetic_preset: {e}") from None
    if "seed" not in base:
        base["seed"] = int(getattr(args, "seed", 0))
    overrides = {"num_users": getattr(args, "synthetic_users", None),
                 "mean_history": getattr(args, "synthetic_mean_history", None),
                 "min_history": getattr(args, "synthetic_min_history", None),
                 "max_history": getattr(args, "synthetic_max_history", None)}
    for k, v in overrides.items():
        if v is not None:
            base[k] = int(v)
    if getattr(args, "synthetic_domains", None) is not None:
        base["num_domains"] = int(args.synthetic_domains)  # 2: the two-domain preset
    try:
        defaults = synthetic.SyntheticConfig.from_dict({k: v for k, v in base.items()
                                                        if k == "seed"})
        if overrides["min_history"] is None and "min_history" not in base:
            mean = base.get("mean_history", defaults.mean_history)
            mx = base.get("max_history", defaults.max_history)
            base["min_history"] = max(1, min(defaults.min_history, mean, mx))
        return synthetic.SyntheticConfig.from_dict(base)
    except (ValueError, TypeError) as e:
        raise PrepareError(f"bad synthetic configuration: {e}") from None


# ======================================================================================
# Driver
# ======================================================================================


def _check_inputs(settings: Mapping[str, Any], args: argparse.Namespace) -> None:
    source = settings["source"]
    if source == "synthetic":
        return
    path = getattr(args, "input", None)
    if not path:
        raise PrepareError(f"--source {source} needs --input (" + (
            "a MovieLens folder: ratings.csv + movies.csv, ratings.dat + movies.dat or "
            "u.data + u.item)" if source == "movielens"
            else "a folder with raw_sample.csv, ad_feature.csv and behavior_log.csv)"
            if source == "taobao_ad" else "UserBehavior.csv or a glob)"))
    if source == "taobao_ad":
        _check_taobao_ad_inputs(path)
    elif source == "movielens":
        if not FileSystems.exists(path):
            raise PrepareError(f"--input {path!r} does not exist")
        layout = A.movielens_layout(lambda name: FileSystems.exists(join(path, name)))
        if layout is None:
            expected = "; ".join(f"{lay.ratings} + {lay.movies} ({lay.releases})"
                                 for lay in A.MOVIELENS_LAYOUTS)
            found = [lay.ratings for lay in A.MOVIELENS_LAYOUTS
                     if FileSystems.exists(join(path, lay.ratings))]
            missing = (f"has {found[0]} but not its movie file" if found else
                       "has no ratings.csv")
            raise PrepareError(f"--input {path!r} {missing}: expected a MovieLens folder "
                               f"with {expected}")
        ratings = join(path, layout.ratings)
        with FileSystems.open(ratings) as f:
            head = f.readline().decode("utf-8", errors="replace").strip().lstrip("\ufeff")
        if not head:
            raise PrepareError(f"{ratings} is empty")
        if layout.header and head.replace(" ", "") != layout.header:
            raise PrepareError(f"{ratings} must start with the header "
                               f"{layout.header!r}, found {head[:80]!r}")
        if not layout.header and len(head.split(layout.sep)) != 4:
            raise PrepareError(f"{ratings}: expected 4 columns separated by "
                               f"{layout.sep!r} (user, movie, rating, timestamp; no header), "
                               f"found {head[:80]!r}")
    else:
        if "://" not in path and os.path.isdir(path):
            raise PrepareError(f"--input {path!r} is a folder; pass UserBehavior.csv or a glob "
                               f"such as {os.path.join(path, '*.csv')!r}")
        try:
            matched = FileSystems.match([path])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - filesystem errors vary by scheme
            raise PrepareError(f"--input {path!r} cannot be listed: {e}") from None
        matched = [m for m in matched if not m.path.endswith("/")]
        if not matched:
            raise PrepareError(f"--input {path!r} matches no file")
        if all(m.size_in_bytes == 0 for m in matched):
            raise PrepareError(f"--input {path!r} is empty ({len(matched)} file(s), 0 bytes)")


def _check_taobao_ad_inputs(path: str) -> None:
    """The Tianchi 56 folder: each file used exists and starts with its header (a file
    without it is rejected: the header fixes the column order; user_profile.csv is not
    needed, its fields have no place in the record)."""
    if not FileSystems.exists(path):
        raise PrepareError(f"--input {path!r} does not exist")
    for name in (A.TAOBAO_AD_RAW_SAMPLE, A.TAOBAO_AD_FEATURE, A.TAOBAO_AD_BEHAVIOR_LOG):
        f = join(path, name)
        if not FileSystems.exists(f):
            raise PrepareError(f"--input {path!r} has no {name} (expected the Tianchi 56 "
                               f"folder: raw_sample.csv, ad_feature.csv, behavior_log.csv)")
        with FileSystems.open(f) as fh:
            head = fh.readline()
        if not head.strip():
            raise PrepareError(f"{f} is empty")
        if not A.header_matches(head, A.TAOBAO_AD_HEADERS[name]):
            raise PrepareError(f"{f} must start with the header "
                               f"{A.TAOBAO_AD_HEADERS[name]!r}, found "
                               f"{head.decode('utf-8', errors='replace').strip()[:80]!r}")


def _existing_outputs(out: str) -> List[str]:
    patterns = [S.split_pattern(out, s) for s in S.SPLITS] + [
        join(out, S.META_FILE), join(out, COUNTS_FILE), join(out, VOCAB_DIR, "*.tsv"),
        join(out, DEAD_LETTER_DIR, "rows-*.tsv")]
    return match_paths(patterns)


def _prepare_output(out: str, overwrite: bool) -> None:
    found = _existing_outputs(out)
    if found:
        if not overwrite:
            raise PrepareError(f"--output {out!r} already holds a prepared dataset "
                               f"({len(found)} files, e.g. {found[0]}); pass --overwrite or "
                               f"choose another folder")
        _log(f"--overwrite: deleting {len(found)} files of the previous dataset in {out}")
        FileSystems.delete(found)
    if "://" not in out:
        try:
            FileSystems.mkdirs(out)
        except IOError:
            pass  # already exists


def run(args: argparse.Namespace, beam_args: List[str]) -> Dict[str, Any]:
    """Run the ``prepare`` pipeline; returns the report (also written as meta.json)."""
    t0 = time.time()
    settings = _validate_args(args)
    if getattr(args, "protocol", None) != settings["protocol"]:
        args.protocol = settings["protocol"]
    _log(f"source={settings['source']} protocol={settings['protocol']} seed={args.seed} "
         f"output={args.output}")
    _log("checking inputs")
    _check_inputs(settings, args)
    synthetic_config = _synthetic_config(args) if settings["source"] == "synthetic" else None
    if (synthetic_config is not None and synthetic_config.num_domains == 2
            and settings["protocol"] == "last_item_per_user"):
        raise PrepareError("two-domain synthetic data (num_domains 2) cannot use --protocol "
                           "last_item_per_user: its last behavior may be a source-domain "
                           "item, but impressions live in the target domain")
    _resolve_time_window(settings, synthetic_config)
    w = settings["time_window"]
    _log(f"valid time window ({settings['time_window_from']}): {A.iso_utc(w.start)} .. "
         f"{A.iso_utc(w.end)} inclusive; rows outside it are dead-lettered")
    _prepare_output(args.output, bool(getattr(args, "overwrite", False)))

    options = PipelineOptions(list(beam_args))
    runner = options.get_all_options().get("runner") or "DirectRunner"
    _log(f"building pipeline (runner {runner}; Beam options {list(beam_args) or 'none'})")
    p = beam.Pipeline(options=options)
    build_pipeline(p, settings, args, synthetic_config)
    _log("running: read+parse -> vocabularies -> split cuts -> per-user records -> write")
    t_run = time.time()
    result = p.run()
    result.wait_until_finish()
    run_s = time.time() - t_run
    _log(f"pipeline finished in {run_s:.1f}s")

    counts_path = join(args.output, COUNTS_FILE)
    if not FileSystems.exists(counts_path):
        raise PrepareError(f"the pipeline wrote no {counts_path}; see the runner's log")
    counts = json.loads(read_text_file(counts_path, errors="replace"))
    report = build_report(counts, settings, args, beam_args, synthetic_config)
    rows = report["rows"]

    counters = query_counters(result, NAMESPACE)
    if counters is not None and counters:
        report["beam_counters"] = dict(sorted(counters.items()))
        want = {"rows_input": rows["input"], "rows_used": rows["used"],
                "rows_filtered": rows["filtered"], "rows_dead_lettered": rows["dead_lettered"]}
        diff = {k: (counters.get(k, 0), v) for k, v in want.items() if counters.get(k, 0) != v}
        if diff:
            _log(f"note: Beam metrics differ from the pipeline's counts (metric, count): {diff}")

    _verify_shards(args.output, settings["num_shards"])
    report["wall_seconds"] = round(time.time() - t0, 3)
    report["pipeline_seconds"] = round(run_s, 3)
    with FileSystems.create(join(args.output, S.META_FILE)) as f:
        f.write(json.dumps(report, indent=2, sort_keys=False).encode("utf-8"))
    FileSystems.delete([counts_path])

    st = report["stats"]
    _log(f"users {st['users']:,}  items {st['items']:,} (+{report['vocab']['oov_items']:,} OOV)  "
         f"categories {st['categories']:,}  events {st['events']:,}")
    _log("impressions " + "  ".join(f"{s} {st['impressions'][s]:,}" for s in S.SPLITS)
         + "  positive rate " + "  ".join(
             f"{s} {st['positive_rate'][s]:.4f}" if st["positive_rate"][s] is not None
             else f"{s} -" for s in S.SPLITS))
    h = st["history_length"]
    _log(f"history length per user: mean {h['mean']:.1f}  median {h['median']:g}  "
         f"max {h['max']:,}")
    if rows["dead_lettered"]:
        _log(f"dead letters by reason: {rows['dead_letter_reasons']} -> "
             f"{join(args.output, DEAD_LETTER_DIR, 'rows-*.tsv')}")
    if rows["filtered"]:
        _log(f"filtered by reason: {rows['filtered_reasons']}")
    ok = rows["input"] == rows["used"] + rows["filtered"] + rows["dead_lettered"]
    _log(f"rows: input {rows['input']:,} = used {rows['used']:,} + filtered "
         f"{rows['filtered']:,} + dead-lettered {rows['dead_lettered']:,}  "
         f"[{'OK' if ok else 'MISMATCH'}]")
    rate = rows["input"] / run_s if run_s > 0 else float("nan")
    _log(f"wrote {args.output} in {report['wall_seconds']:.1f}s ({rate:,.0f} input rows/s "
         f"in the pipeline)")

    if rows["input"] == 0:
        raise PrepareError(f"the input holds no rows ({args.input or 'synthetic'})")
    if rows["used"] == 0:
        raise PrepareError(f"no usable rows: all {rows['input']:,} input rows were dead-lettered "
                           f"({rows['dead_lettered']:,}) or filtered ({rows['filtered']:,}); "
                           f"see {join(args.output, DEAD_LETTER_DIR)}")
    if not ok:
        raise PrepareError("row accounting mismatch (a bug): input != used + filtered + "
                           "dead-lettered; see meta.json rows")
    return report


def _verify_shards(out: str, num_shards: int) -> None:
    for split in S.SPLITS:
        found = split_files(out, split)
        want = sorted(join(out, f"{split}-{i:05d}-of-{num_shards:05d}{TFRECORD_SUFFIX}")
                      for i in range(num_shards))
        if [f.rsplit("/", 1)[-1] for f in found] != [w.rsplit("/", 1)[-1] for w in want]:
            raise PrepareError(f"unexpected {split} shard files in {out}: "
                               f"{[f.rsplit('/', 1)[-1] for f in found]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m beam_jobs.prepare ...`` (the console entry point calls :func:`run`)."""
    return beam_main("prepare", __doc__, add_arguments, run, PrepareError, argv)


if __name__ == "__main__":
    sys.exit(main())
