"""Dense vocabularies of the sample-building job: items, categories, users.

Each vocabulary is one list collected by a combiner and turned into ids by
:func:`build_vocab`: ordered by descending count then key, ids from
``FIRST_ID``, entries seen fewer than ``min_count`` times map to ``OOV_ID``.
An item's category is its most frequent one (:class:`CategoryOfItem`).
Written as ``vocab/<name>.tsv`` (:func:`vocab_tsv`: ``dense_id<TAB>raw_key<TAB>count``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Tuple

import apache_beam as beam

from tfmodels import schema as S


def build_vocab(entries: Iterable[Tuple[str, Any]], min_count: int = 1) -> Dict[str, Any]:
    """``[(key, count)]`` or ``[(key, (count, category))]`` -> dense vocabulary.

    Ordered by descending count then key; ids start at ``FIRST_ID``; entries
    with ``count < min_count`` get no id (they map to ``OOV_ID``).
    """
    ordered = sorted(((k, v if isinstance(v, tuple) else (v, None)) for k, v in entries),
                     key=lambda e: (-e[1][0], e[0]))
    keys, counts, cates = [], [], []
    oov_keys = oov_rows = 0
    for key, (count, cate) in ordered:
        if count < min_count:
            oov_keys += 1
            oov_rows += count
            continue
        keys.append(key)
        counts.append(count)
        cates.append(cate)
    return {"ids": {k: S.FIRST_ID + i for i, k in enumerate(keys)}, "keys": keys,
            "counts": counts, "cates": cates, "oov_keys": oov_keys, "oov_rows": oov_rows}


def vocab_tsv(vocab: Mapping[str, Any]) -> str:
    return "".join(f"{S.FIRST_ID + i}\t{k}\t{c}\n"
                   for i, (k, c) in enumerate(zip(vocab["keys"], vocab["counts"])))


class CategoryOfItem(beam.CombineFn):
    """category keys of one item's rows -> (row count, most frequent category)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, cate):
        acc[cate] = acc.get(cate, 0) + 1
        return acc

    def merge_accumulators(self, accs):
        out: Dict[str, int] = {}
        for a in accs:
            for k, v in a.items():
                out[k] = out.get(k, 0) + v
        return out

    def extract_output(self, acc):
        if not acc:
            return (0, "")
        best = min(acc.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        return (sum(acc.values()), best)


def vocab_item_rows(user, with_impressions: bool):
    """A user -> ``(item_key, cate_key)`` of every event (and impression, if asked)."""
    _, events, imps = user
    for e in events:
        yield (e[0], e[1])
    if with_impressions and imps:
        for i in imps:
            yield (i[0], i[1])


def vocab_counts(vocab, name: str) -> Dict[str, Any]:
    """A vocabulary -> its contribution to the report (entries, OOV keys and rows)."""
    return {"vocab_entries": {name: len(vocab["keys"]), f"oov_{name}": vocab["oov_keys"],
                              f"oov_{name}_rows": vocab["oov_rows"]}}


def item_domain_rows(user):
    """A user -> ``(item_key, domain)`` of every event (impressions carry no domain)."""
    for e in user[1]:
        yield (e[0], int(e[4]))


def build_item_table(item_vocab: Mapping[str, Any], cate_vocab: Mapping[str, Any],
                     item_domains: Iterable[Tuple[str, Tuple[int, int]]]) -> Dict[str, list]:
    """The compact format's item table: ``cate[i]`` / ``domain[i]`` by dense item id.

    An item's category is its vocabulary category (the most frequent one,
    :class:`CategoryOfItem`), its domain the most frequent domain of its events (the
    target domain for an item seen only in impressions). Row 0 = padding (0, 0), row 1
    = the OOV item (OOV category, default domain): rows that differ are stored in the
    record itself.
    """
    domain_of = {k: d for k, (_, d) in item_domains}
    cate_ids = cate_vocab["ids"]
    cate = [S.PAD_ID, S.OOV_ID] + [cate_ids.get(c, S.OOV_ID) for c in item_vocab["cates"]]
    domain = [S.PAD_ID, S.DEFAULT_DOMAIN] + [int(domain_of.get(k, S.TARGET_DOMAIN))
                                             for k in item_vocab["keys"]]
    return {"cate": cate, "domain": domain}


def item_table_tsv(table: Mapping[str, list]) -> str:
    import numpy as np
    return S.ItemTable(np.asarray(table["cate"], np.int64),
                       np.asarray(table["domain"], np.int64)).to_tsv()
