"""The graph of the sample-building job: source -> vocabularies -> protocol -> TFRecords.

:func:`build_pipeline` adds the whole job to a ``beam.Pipeline`` (the driver,
:mod:`beam_jobs.prepare`, runs it):

1. source -> users ``(user_key, events, impressions|None)``;
2. dead letters -> ``dead_letter/rows-*.tsv``;
3. item and category vocabularies (combiners -> side inputs) -> ``vocab/*.tsv``;
4. the protocol, with exact time cuts (per event) or user cuts (user splits);
5. the user vocabulary (users with at least one record);
6. encode and write ``{train,valid,test}-*.tfrecord.gz``;
7. the report's counts, summed -> ``_counts.json`` (read back by the driver).
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_jobs import adapters as A
from beam_jobs.prepare_protocols import split_index
from beam_jobs.prepare_transforms import (ApplyProtocol, EncodeRecords, ExactCuts, GenerateUsers,
                                          ParseRows, _hour, _hour_of_key)
from beam_jobs.prepare_vocab import (CategoryOfItem, build_item_table, build_vocab,
                                     item_domain_rows, item_table_tsv, vocab_counts,
                                     vocab_item_rows, vocab_tsv)
from beam_jobs.sharded_io import (WriteCounts, join, read_text_file, write_split,
                                  write_text_file)
from tfmodels import schema as S

COUNTS_FILE = "_counts.json"     # the pipeline's own report (read back by the driver)
VOCAB_DIR = "vocab"
DEAD_LETTER_DIR = "dead_letter"


def _assign_split(keyed, cuts):
    key, rec = keyed
    rec = dict(rec)
    rec["split"] = S.SPLITS[split_index(key, cuts)]
    return rec


def _split_of(kv, n):
    return S.SPLITS.index(kv[0])


def build_pipeline(p: beam.Pipeline, settings: Mapping[str, Any], args: argparse.Namespace,
                   synthetic_config=None) -> None:
    """Add the whole job to ``p``."""
    source, protocol = settings["source"], settings["protocol"]
    out = args.output
    counts_parts = []

    # ---- 1. source -> users (user_key, events, impressions|None) ----------------------
    if source == "synthetic":
        n = synthetic_config.num_users
        chunk = 100
        gen = (p
               | "UserRanges" >> beam.Create([(s, min(n, s + chunk)) for s in range(0, n, chunk)])
               | "SpreadUsers" >> beam.Reshuffle()
               | "Generate" >> beam.ParDo(GenerateUsers(synthetic_config.to_dict(),
                                                        settings.get("time_window")))
               .with_outputs("dead", "counts", main="users"))
        users, dead = gen.users, gen.dead
        counts_parts.append(gen.counts)
    elif source == "taobao_ad":
        from beam_jobs.prepare_taobao_ad import TaobaoAdUsers  # lazy: this source only
        src = p | "TaobaoAd" >> TaobaoAdUsers(args.input, settings["keep"],
                                              settings.get("time_window"))
        users, dead = src["users"], src["dead"]
        counts_parts.append(src["counts"])
    else:
        if source == "movielens":
            layout = A.movielens_layout(lambda name: FileSystems.exists(join(args.input, name)))
            ratings = join(args.input, layout.ratings)
            movies = join(args.input, layout.movies)
            lines = p | "ReadRatings" >> beam.io.ReadFromText(
                ratings, skip_header_lines=1 if layout.header else 0,
                coder=beam.coders.BytesCoder())
            # errors="replace": the older movie files are Latin-1; only ids and genres
            # (ASCII) are read from them
            movie_table = (p
                           | "MoviesPath" >> beam.Create([movies])
                           | "ReadMovies" >> beam.Map(read_text_file, errors="replace")
                           | "ParseMovies" >> beam.Map(
                               lambda text, layout=layout: A.parse_movies_file(layout, text)))
            genres = beam.pvalue.AsSingleton(movie_table | "Genres" >> beam.Map(lambda t: t[0]))
            counts_parts.append(movie_table | "MovieCounts" >> beam.Map(
                lambda t: {"movies": {"rows": len(t[0]), "malformed": t[1]}}))
            parsed = lines | "Parse" >> beam.ParDo(
                ParseRows(source, window=settings.get("time_window"),
                          domains=settings.get("movielens_domains", "none"), sep=layout.sep),
                genres).with_outputs(
                "dead", "counts", main="behaviors")
        else:
            lines = p | "ReadBehaviors" >> beam.io.ReadFromText(
                args.input, coder=beam.coders.BytesCoder())
            parsed = lines | "Parse" >> beam.ParDo(
                ParseRows(source, settings["keep"], settings.get("time_window"))).with_outputs(
                "dead", "counts", main="behaviors")
        counts_parts.append(parsed.counts)
        dead = parsed.dead
        # GroupByKey spreads users over workers, so no extra Reshuffle is needed here.
        users = (parsed.behaviors
                 | "GroupByUser" >> beam.GroupByKey()
                 | "UserTuple" >> beam.MapTuple(lambda k, evs: (k, list(evs), None)))

    # ---- 2. dead letters ----------------------------------------------------------------
    _ = dead | "WriteDeadLetters" >> beam.io.WriteToText(
        join(out, DEAD_LETTER_DIR, "rows"), file_name_suffix=".tsv")

    # ---- 3. item and category vocabularies ---------------------------------------------
    item_cate = users | "ItemCateRows" >> beam.FlatMap(
        vocab_item_rows, protocol in ("labeled_impressions", "labeled_impressions_time_split"))
    item_vocab = (item_cate
                  | "CategoryOfItem" >> beam.CombinePerKey(CategoryOfItem())
                  | "ItemList" >> beam.combiners.ToList()
                  | "ItemVocab" >> beam.Map(build_vocab, int(args.min_item_count)))
    cate_vocab = (item_cate
                  | "CateKeys" >> beam.Map(lambda ic: ic[1])
                  | "CountCates" >> beam.combiners.Count.PerElement()
                  | "CateList" >> beam.combiners.ToList()
                  | "CateVocab" >> beam.Map(build_vocab, 1))
    item_si = beam.pvalue.AsSingleton(item_vocab)
    cate_si = beam.pvalue.AsSingleton(cate_vocab)
    for name, vocab in (("items", item_vocab), ("categories", cate_vocab)):
        _ = (vocab | f"{name}Tsv" >> beam.Map(vocab_tsv)
             | f"Write_{name}" >> beam.Map(write_text_file, join(out, VOCAB_DIR, f"{name}.tsv")))
        counts_parts.append(vocab | f"{name}Counts" >> beam.Map(vocab_counts, name))

    # ---- 4. protocol --------------------------------------------------------------------
    fractions = settings["fractions"]
    dofn = ApplyProtocol(protocol, args.seed, args.max_history, args.label_threshold)
    if protocol == "per_event_time_split":
        cuts = (users
                # the samples' times: target-domain events (all events of one-domain data)
                | "EventTimes" >> beam.FlatMap(
                    lambda u: [int(e[2]) for e in u[1] if e[4] == A.TARGET_DOMAIN])
                | "TimeCuts" >> ExactCuts(fractions, _hour))
        applied = users | "PerEvent" >> beam.ParDo(
            dofn, item_si, cate_si, beam.pvalue.AsSingleton(cuts)).with_outputs(
            "counts", "user_rows", main="records")
        records = applied.records
        counts_parts.append(cuts | "CutCounts" >> beam.Map(
            lambda c: {"split_cuts": {"train_end_ts": c[0], "valid_end_ts": c[1]}}))
    elif protocol == "labeled_impressions_time_split":   # fixed cuts (taobao_ad days)
        cuts = tuple(settings["cuts"])
        applied = users | "PerSplit" >> beam.ParDo(dofn, item_si, cate_si, cuts).with_outputs(
            "counts", "user_rows", main="records")
        records = applied.records
        counts_parts.append(p | "CutCounts" >> beam.Create(
            [{"split_cuts": {"train_end_ts": cuts[0], "valid_end_ts": cuts[1]}}]))
    else:
        applied = users | "PerUser" >> beam.ParDo(dofn, item_si, cate_si).with_outputs(
            "counts", "user_rows", main="keyed")
        cuts = (applied.keyed | "SplitKeys" >> beam.Map(lambda kr: kr[0])
                | "UserCuts" >> ExactCuts(fractions, _hour_of_key))
        records = applied.keyed | "AssignSplit" >> beam.Map(
            _assign_split, beam.pvalue.AsSingleton(cuts))
        counts_parts.append(cuts | "CutCounts" >> beam.Map(lambda c: {"split_cuts": {
            "train_end": None if c[0] is None else f"ts={c[0][0]} user={c[0][1]}",
            "valid_end": None if c[1] is None else f"ts={c[1][0]} user={c[1][1]}"}}))
    counts_parts.append(applied.counts)

    # ---- 5. user vocabulary (users with at least one record) ------------------------------
    user_vocab = (applied.user_rows
                  | "UserList" >> beam.combiners.ToList()
                  | "UserVocab" >> beam.Map(build_vocab, 1))
    _ = (user_vocab | "usersTsv" >> beam.Map(vocab_tsv)
         | "Write_users" >> beam.Map(write_text_file, join(out, VOCAB_DIR, "users.tsv")))
    counts_parts.append(user_vocab | "usersCounts" >> beam.Map(vocab_counts, "users"))

    # ---- 6. encode and write sharded TFRecords ----------------------------------------------
    if settings.get("record_format", "full") in ("compact", "compact2"):
        # the item table (item id -> category, domain) of the compact records
        item_domains = (users
                        | "ItemDomainRows" >> beam.FlatMap(item_domain_rows)
                        | "DomainOfItem" >> beam.CombinePerKey(CategoryOfItem())
                        | "ItemDomainList" >> beam.combiners.ToList())
        item_table = (item_vocab | "ItemTable" >> beam.Map(
            build_item_table, cate_si, beam.pvalue.AsSingleton(item_domains)))
        _ = (item_table | "ItemTableTsv" >> beam.Map(item_table_tsv)
             | "Write_item_table" >> beam.Map(write_text_file, join(out, S.ITEM_TABLE_FILE)))
        encoded = records | "Encode" >> beam.ParDo(
            EncodeRecords(settings["engage_step"], settings["record_format"],
                          settings.get("ts_step", 1)), beam.pvalue.AsSingleton(user_vocab),
            beam.pvalue.AsSingleton(item_table)).with_outputs("counts", main="records")
    else:
        encoded = records | "Encode" >> beam.ParDo(
            EncodeRecords(), beam.pvalue.AsSingleton(user_vocab)).with_outputs(
            "counts", main="records")
    counts_parts.append(encoded.counts)
    encoded = encoded.records
    by_split = encoded | "BySplit" >> beam.Partition(_split_of, len(S.SPLITS))
    for i, split in enumerate(S.SPLITS):
        _ = (by_split[i]
             | f"{split}Bytes" >> beam.Map(lambda kv: kv[1])
             | f"Write_{split}" >> write_split(out, split, settings["num_shards"]))

    # ---- 7. the report's counts ---------------------------------------------------------------
    _ = tuple(counts_parts) | "Counts" >> WriteCounts(join(out, COUNTS_FILE))
