"""LCN's consistency analysis (METHODS 2.5; the paper's Figure 5): how much of FSA's
top-K2 over the FULL lifelong sequence LAP's earlier levels keep.

For sampled (user, candidate) pairs of a split -- the candidates are the user's
impressions there, each with its own long window -- and a LAP model (a trained
``lcn`` run, ``--run``; or, with ``--data`` and no run, a freshly initialised one):

* the oracle O: the top-K2 valid items of the whole window by FSA's attention
  logits, averaged over the heads ([interp]: the paper ranks by "attention scores"
  of the final level; the per-head logits mean_h Q_h . K_{h,k} / sqrt(d_h) are one
  number per item whatever the pool, so FSA's ranking of a pool is its ranking of
  the window restricted to the pool). |O| = min(K2, valid items).
* per K1 in ``--k1s`` (default 50, 100, 200, L/4; clamped to L), the share of O found by

  (a) ``csa``: CSA's top-K1 (what survives the first cut);
  (b) ``lap``: MSA's top-K2 within CSA's top-K1 -- the full pyramid, FSA's pool (the
      paper's LAP "test set"); K2 clamped to K1 as the module does;
  (c) ``csa_fsa``: a two-stage cascade CSA -> FSA: FSA's top-K2 within CSA's top-K1.
      Because FSA ranks any pool in its whole-window order, (c) finds every item of O
      that (a) kept: (c) = (a) exactly. The difference is cost: the cascade runs FSA
      (l heads + the per-item FFN) over K1 rows per candidate, the pyramid over K2.
* once, independent of K1: (d) ``csa_topk2``: CSA's top-K2 (a two-stage GSU -> ESU
  retrieval that passes K2 items to FSA, as SIM / ETA / TWIN do: the paper's
  Figure 5(a) comparison).

Scores come from :meth:`tfmodels.methods.lcn.LAP.level_scores` (the same math as
``LAP.attend``, whose ``index1`` / ``index2`` equal (a) / (b)'s selections at the
model's own K1, K2: tests/test_lcn_consistency.py). Ties go to the lower position,
as in the module. A pair's share is |found & O| / |O|; the table shows the mean over
pairs (pairs without a valid item are skipped; pairs with at most K1 valid items
have (a) = 1 by construction and are counted in ``pairs_within_k1``).

Writes ``consistency.json`` (per K1 and per pair) and ``consistency.png`` (share vs
K1 per level, L/4 marked) to ``--out_dir`` (default RUN_DIR/lcn_consistency, or
./lcn_consistency without a run) and prints a markdown table.

Usage: ``lifelong lcn-consistency --run RUN_DIR [--split test] [--num_users 200]``
or ``lifelong lcn-consistency --data DIR --long_len L`` (untrained model).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

# TensorFlow, the schema and the trainer load inside the functions that use them, so
# `lifelong lcn-consistency --help` answers without TensorFlow.

LEVEL_KEYS = ("csa", "lap", "csa_fsa")
LEVEL_NAMES = {"csa": "(a) CSA top-K1", "lap": "(b) LAP: MSA top-K2 of CSA top-K1",
               "csa_fsa": "(c) cascade CSA -> FSA: FSA top-K2 of CSA top-K1",
               "csa_topk2": "(d) two-stage: CSA top-K2"}


def _error(msg: str):
    from tfmodels.train import ConfigError
    return ConfigError(msg)


# ---- the pure part (NumPy) -------------------------------------------------------------------
def top_k(score: np.ndarray, valid: np.ndarray, k: int,
          pool: Optional[np.ndarray] = None) -> np.ndarray:
    """Boolean [L]: the top-``k`` valid positions of ``score`` (within ``pool`` when
    given), ties to the lower position (the module's top-k rule)."""
    ok = valid.astype(bool) if pool is None else (valid.astype(bool) & pool)
    cand = np.flatnonzero(ok)
    order = cand[np.lexsort((cand, -score[cand].astype(np.float64)))]   # score desc, index asc
    out = np.zeros(score.shape[0], bool)
    out[order[:k]] = True
    return out


def pair_shares(csa: np.ndarray, msa: Optional[np.ndarray], fsa: np.ndarray,
                mask: np.ndarray, k1s: Sequence[int], k2: int) -> Optional[Dict]:
    """One (user, candidate): the share of FSA's whole-window top-``k2`` that each level
    keeps, per K1 in ``k1s``; None without a valid item. Inputs are [L] per-item scores."""
    valid = mask > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        return None
    oracle = top_k(fsa, valid, k2)
    size = int(oracle.sum())
    share = lambda sel: float((sel & oracle).sum()) / size
    out = {"valid": n_valid, "oracle": size,
           "csa_topk2": share(top_k(csa, valid, k2)), "per_k1": {}}
    for k1 in k1s:
        pool = top_k(csa, valid, k1)
        row = {"csa": share(pool), "csa_fsa": share(top_k(fsa, valid, k2, pool))}
        row["lap"] = (share(top_k(msa, valid, min(k2, k1), pool)) if msa is not None
                      else None)
        out["per_k1"][int(k1)] = row
    return out


def parse_k1s(text: str, long_len: int) -> List[int]:
    """``50,100,200,L/4`` -> sorted distinct K1 values clamped to ``long_len``
    (``L/n`` = long_len // n, ``L`` = long_len)."""
    out = []
    for tok in str(text).split(","):
        tok = tok.strip().replace(" ", "")
        if not tok:
            continue
        try:
            if tok.upper() == "L":
                v = long_len
            elif tok.upper().startswith("L/"):
                v = long_len // int(tok[2:])
            else:
                v = int(tok)
        except (ValueError, ZeroDivisionError):
            raise _error(f"--k1s: {tok!r} is neither an integer nor L/n") from None
        if v < 1:
            raise _error(f"--k1s: K1 must be >= 1, got {tok!r} = {v} (L = {long_len})")
        out.append(min(v, long_len))
    if not out:
        raise _error("--k1s is empty")
    return sorted(set(out))


def summarize(pairs: List[Dict], k1s: Sequence[int]) -> Dict:
    """Mean share over pairs per K1 and level (None where a level does not run)."""
    per_k1 = {}
    for k1 in k1s:
        row = {}
        for key in LEVEL_KEYS:
            v = [p["per_k1"][k1][key] for p in pairs if p["per_k1"][k1][key] is not None]
            row[key] = float(np.mean(v)) if v else None
        row["pairs_within_k1"] = int(sum(p["valid"] <= k1 for p in pairs))
        per_k1[int(k1)] = row
    d = [p["csa_topk2"] for p in pairs]
    return {"per_k1": per_k1, "csa_topk2": float(np.mean(d)) if d else None}


# ---- model and data ----------------------------------------------------------------------------
def _load(args):
    """(TrainConfig, model) of ``--run``, or of an untrained LCN built from ``--data``."""
    import tensorflow as tf
    from tfmodels import train as T
    if args.run:
        if args.long_len is not None:
            raise _error("--long_len is for an untrained model (--data without --run); a "
                         "run uses the L it was trained with")
        return T.load_run(args.run, args.data)
    if not args.data:
        raise _error("give --run RUN_DIR (a trained lcn run) or --data DIR (a prepared "
                     "dataset; an untrained model)")
    from tfmodels import schema as S
    try:
        S.read_meta(args.data)
    except FileNotFoundError as e:
        raise _error(f"--data: {e}") from e
    cfg = T.TrainConfig(data=args.data, model=args.model, seed=args.seed,
                        long_len=args.long_len or T.TrainConfig.long_len,
                        emb_dim=args.emb_dim, cross_domain=bool(args.cross_domain))
    if args.short_len:
        cfg.short_len = args.short_len
    cfg.validate()
    tf.keras.utils.set_random_seed(args.seed)
    return cfg, T.model_from_config(cfg, T.feature_schema_for(cfg))


def _check_model(cfg, model, where: str):
    from tfmodels.methods.lcn import LAP
    lap = model.long_module
    if not isinstance(lap, LAP):
        raise _error(f"{where} is a {cfg.model!r} model; lcn-consistency needs an LCN "
                     f"model (LAP: lcn, lcn_k1_only)")
    if not (lap.csa and lap.fsa):
        raise _error(f"{where}: model {cfg.model!r} runs LAP levels {lap.levels}; the "
                     f"consistency analysis needs CSA and FSA")
    return lap


def consistency(args) -> Dict:
    import tensorflow as tf
    from tfmodels import data as D
    from tfmodels import schema as S
    from tfmodels.train import git_commit
    if args.split not in S.SPLITS:
        raise _error(f"--split must be one of {S.SPLITS}, got {args.split!r}")
    if args.num_users < 1 or args.candidates_per_user < 1 or args.batch_size < 1:
        raise _error("--num_users, --candidates_per_user and --batch_size must be >= 1")
    cfg, model = _load(args)
    lap = _check_model(cfg, model, repr(args.run) if args.run else f"--model {cfg.model}")
    long_len = model.feature_schema.long_len
    k1s = parse_k1s(args.k1s, long_len)
    k2 = int(args.k2 or lap.k2)
    if k2 < 1:
        raise _error(f"--k2 must be >= 1, got {k2}")
    ds = D.make_dataset(S.split_pattern(cfg.data, args.split), model.feature_schema.short_len,
                        long_len, args.batch_size, shuffle=True, seed=args.seed,
                        shuffle_buffer=10_000, cross_domain=model.feature_schema.cross_domain)
    taken: Dict[int, int] = {}
    pairs: List[Dict] = []
    for batch in ds:
        users = batch["user_id"].numpy()
        keep = []
        for i, u in enumerate(users.tolist()):
            if u not in taken and len(taken) >= args.num_users:
                continue
            if taken.get(u, 0) < args.candidates_per_user:
                taken[u] = taken.get(u, 0) + 1
                keep.append(i)
        if keep:
            feats = {k: tf.gather(v, keep) for k, v in batch.items()}
            cache = lap.user_cache(model.embed_sequence(feats, "long"))
            scores = {k: v.numpy() for k, v in
                      lap.level_scores(cache, model.embed_target(feats)).items()}
            for j, i in enumerate(keep):
                p = pair_shares(scores["csa"][j], scores["msa"][j] if "msa" in scores else None,
                                scores["fsa"][j], scores["mask"][j], k1s, k2)
                if p is not None:
                    pairs.append({"user_id": int(users[i]),
                                  "target_item_id": int(feats["target_item_id"][j]), **p})
        if len(taken) >= args.num_users:
            break
    if not pairs:
        raise _error(f"no (user, candidate) pair with a non-empty long window in the "
                     f"{args.split!r} split of {cfg.data!r}")
    return {"run": args.run, "model": cfg.model, "data": cfg.data, "split": args.split,
            "trained": bool(args.run), "long_len": long_len,
            "k1_model": min(lap.k1, long_len),
            "k2": k2, "k1s": k1s, "levels": list(lap.levels), "seed": args.seed,
            "users": len(taken), "pairs": len(pairs),
            "valid_items_mean": float(np.mean([p["valid"] for p in pairs])),
            "oracle": "top-K2 of FSA's head-averaged attention logits over the whole window",
            **summarize(pairs, k1s), "git_commit": git_commit(), "per_pair": pairs}


# ---- output ------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_table(r: Dict) -> str:
    lines = [f"{'run=' + r['run'] if r['run'] else 'untrained'} model={r['model']} "
             f"split={r['split']} L={r['long_len']} K2={r['k2']} (model K1={r['k1_model']}) "
             f"seed={r['seed']}",
             f"{r['pairs']} (user, candidate) pairs of {r['users']} users; valid items per "
             f"window {r['valid_items_mean']:.1f}; share of FSA's top-{r['k2']} over the "
             f"whole window found by each level (mean over pairs)", "",
             "| K1 | " + " | ".join(LEVEL_NAMES[k] for k in LEVEL_KEYS)
             + " | FSA rows: LAP / cascade | pairs with <= K1 items |",
             "|---|" + "---|" * (len(LEVEL_KEYS) + 2)]
    for k1, row in r["per_k1"].items():
        mark = " *" if int(k1) == r["k1_model"] else ""
        lines.append(f"| {k1}{mark} | " + " | ".join(_fmt(row[k]) for k in LEVEL_KEYS)
                     + f" | {min(r['k2'], int(k1))} / {k1} | {row['pairs_within_k1']} |")
    lines += ["", f"{LEVEL_NAMES['csa_topk2']} (K1-independent, FSA over {r['k2']} rows): "
              f"{_fmt(r['csa_topk2'])}",
              "(c) = (a) by construction (FSA ranks any pool in its whole-window order); "
              "* = the model's K1"]
    return "\n".join(lines)


def plot(r: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k1s = [int(k) for k in r["per_k1"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, style in zip(LEVEL_KEYS, ("o-", "s-", "x--")):
        ys = [r["per_k1"][k][key] for k in r["per_k1"]]
        if any(y is not None for y in ys):
            ax.plot(k1s, [np.nan if y is None else y for y in ys], style, label=LEVEL_NAMES[key])
    if r["csa_topk2"] is not None:
        ax.axhline(r["csa_topk2"], color="grey", ls=":", label=LEVEL_NAMES["csa_topk2"])
    ax.axvline(r["long_len"] / 4, color="k", lw=0.6, ls="--", label="K1 = L/4")
    ax.set_xlabel("K1")
    ax.set_ylabel(f"share of FSA's top-{r['k2']} found")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"LCN consistency: {r['model']} ({'trained' if r['trained'] else 'untrained'})"
                 f", L={r['long_len']}, {r['pairs']} pairs", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="a trained LCN run directory (lifelong train --model lcn)")
    parser.add_argument("--data", help="a prepared dataset: the run's data instead (same "
                        "vocab), or, without --run, the data of an untrained model")
    parser.add_argument("--split", default="test", help="train | valid | test (default test)")
    parser.add_argument("--num_users", type=int, default=200,
                        help="users sampled from the split (default 200)")
    parser.add_argument("--candidates_per_user", type=int, default=5,
                        help="impressions (candidates) per sampled user (default 5)")
    parser.add_argument("--k1s", default="50,100,200,L/4",
                        help="K1 values, comma separated; L/n = long_len // n "
                        "(default 50,100,200,L/4)")
    parser.add_argument("--k2", type=int, help="K2, the oracle's and the pyramid's size "
                        "(default: the model's k2, 50)")
    parser.add_argument("--seed", type=int, default=0,
                        help="user sample seed (and the untrained model's init)")
    parser.add_argument("--batch_size", type=int, default=64, help="impressions per batch")
    parser.add_argument("--out_dir", help="where consistency.json / .png go (default "
                        "RUN_DIR/lcn_consistency, or ./lcn_consistency without --run)")
    untrained = parser.add_argument_group("untrained model (--data without --run)")
    untrained.add_argument("--model", default="lcn", help="an LCN registry name (default lcn)")
    untrained.add_argument("--long_len", type=int, help="L (default 1000)")
    untrained.add_argument("--short_len", type=int, help="S (default 50)")
    untrained.add_argument("--emb_dim", type=int, default=16, help="per-field embedding size")
    untrained.add_argument("--cross_domain", action="store_true",
                           help="source-only long window (two-domain data)")


def run(args, extra: Optional[List[str]] = None) -> int:
    result = consistency(args)
    out_dir = args.out_dir or (os.path.join(args.run, "lcn_consistency") if args.run
                               else "lcn_consistency")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "consistency.json")
    png_path = os.path.join(out_dir, "consistency.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot(result, png_path)
    print(format_table(result))
    print(f"[lcn-consistency] wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lcn_consistency", description="Share of FSA's whole-window top-K2 that LAP's "
        "earlier levels keep, per K1.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from tfmodels.errors import LifelongError
    try:
        return run(args)
    except LifelongError as e:
        print(f"lcn_consistency: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
