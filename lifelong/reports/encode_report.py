"""ENCODE diagnostics: does the trained reduction W_h keep the order of original distances?

METHODS 2.2, faithfulness test 1: triplet agreement
P[sign(dis(h_i, h_j) - dis(h_i, h_k)) = sign(dis(s_i, s_j) - dis(s_i, s_k))] with
dis the cosine distance (E1) and h = W_h^T s (E3), plus the Spearman correlation of
pairwise distances in the two spaces. :func:`triplet_order_preservation` measures
both for a trained model's W_h against a fresh N(0, 1) projection on the real
behavior embeddings (the trained item embedding) of a sample of users.

Usage: ``lifelong encode-report --run RUN_DIR`` (the report the ``encode`` registry
entry declares), or::

    python -m lifelong.reports.encode_report --run RUN_DIR [--data DATA] [--users 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

import tfmodels  # noqa: F401
from tfmodels.errors import UsageError


def _cos_dist_rows(a: np.ndarray) -> np.ndarray:
    """Pairwise cosine distances [n, n] of the rows of ``a`` (zero rows -> distance 1)."""
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    u = a / np.maximum(norm, 1e-12)
    return 1.0 - u @ u.T


def triplet_agreement(sequences: Iterable[np.ndarray], w: np.ndarray, triplets_per_seq: int = 200,
                      seed: int = 0) -> float:
    """Fraction of random within-sequence triplets (i, j, k) whose distance order is
    the same in the reduced space h = s W as in the original space.

    ``sequences``: arrays [n_u, d] of real behavior embeddings (one per user, n_u >= 3).
    Triplets whose original distances tie exactly are skipped.
    """
    rng = np.random.default_rng(seed)
    agree, total = 0, 0
    for s in sequences:
        s = np.asarray(s, np.float64)
        n = s.shape[0]
        if n < 3:
            continue
        ds, dh = _cos_dist_rows(s), _cos_dist_rows(s @ w)
        i = rng.integers(0, n, triplets_per_seq)
        j = (i + rng.integers(1, n, triplets_per_seq)) % n
        k = rng.integers(0, n, triplets_per_seq)
        ok = (k != i) & (k != j)
        i, j, k = i[ok], j[ok], k[ok]
        so = np.sign(ds[i, j] - ds[i, k])
        ho = np.sign(dh[i, j] - dh[i, k])
        keep = so != 0
        agree += int(np.sum(so[keep] == ho[keep]))
        total += int(np.sum(keep))
    return agree / max(total, 1)


def distance_spearman(sequences: Iterable[np.ndarray], w: np.ndarray) -> float:
    """Mean over sequences of the Spearman correlation of pairwise cosine distances
    (original vs reduced)."""
    from scipy.stats import spearmanr
    vals = []
    for s in sequences:
        s = np.asarray(s, np.float64)
        n = s.shape[0]
        if n < 3:
            continue
        iu = np.triu_indices(n, 1)
        rho = spearmanr(_cos_dist_rows(s)[iu], _cos_dist_rows(s @ w)[iu]).correlation
        if np.isfinite(rho):
            vals.append(rho)
    return float(np.mean(vals)) if vals else float("nan")


def compare_projections(sequences: Sequence[np.ndarray], trained_w: np.ndarray,
                        seed: int = 0, triplets_per_seq: int = 200) -> Dict[str, float]:
    """Agreement and Spearman of ``trained_w`` vs a fresh N(0, 1) projection of the same shape."""
    fresh = np.random.default_rng(seed + 12345).normal(size=trained_w.shape)
    return {"trained_agreement": triplet_agreement(sequences, trained_w, triplets_per_seq, seed),
            "random_agreement": triplet_agreement(sequences, fresh, triplets_per_seq, seed),
            "trained_spearman": distance_spearman(sequences, trained_w),
            "random_spearman": distance_spearman(sequences, fresh),
            "users": len(sequences)}


def user_sequences(model, batches: Iterable, num_users: int = 200) -> list:
    """Real long-sequence behavior embeddings [n_u, d] of up to ``num_users`` distinct
    users (their first window with >= 3 real behaviors), from the model's embedding."""
    seen, out = set(), []
    for batch in batches:
        seq = model.embed_sequence(batch, "long")
        emb, mask = seq["emb"].numpy(), seq["mask"].numpy()
        users = batch["user_id"].numpy()
        for row in range(emb.shape[0]):
            u = int(users[row])
            if u in seen or mask[row].sum() < 3:
                continue
            seen.add(u)
            out.append(emb[row][mask[row] > 0])
            if len(out) >= num_users:
                return out
    return out


def triplet_order_preservation(run_dir_or_model: Union[str, object], data: Optional[str] = None,
                               split: str = "test", num_users: int = 200,
                               triplets_per_seq: int = 200, seed: int = 0,
                               batch_size: int = 64) -> Dict[str, float]:
    """Fraction of preserved triplet orders (and distance Spearman) of a trained ENCODE
    model's W_h vs a fresh N(0, 1) projection, on real behavior embeddings of a
    sample of users of ``split``.

    ``run_dir_or_model``: a run directory written by ``lifelong train``/``compare``, or a
    built :class:`~tfmodels.model.LifelongCTRModel` (then ``data`` is required).
    """
    from tfmodels import data as D
    from tfmodels import schema as S
    if isinstance(run_dir_or_model, str):
        from tfmodels import train as T
        cfg, model = T.load_run(run_dir_or_model, data)
        data = cfg.data
    else:
        model = run_dir_or_model
        if data is None:
            raise ValueError("pass data= (a prepared dataset directory) with a model object")
    module = getattr(model, "long_module", None)
    if module is None or not hasattr(module, "reduction"):
        raise UsageError(f"model {getattr(model, 'model_name', model)!r} is not an ENCODE model")
    fs = model.feature_schema
    ds = D.make_dataset(S.split_pattern(data, split), fs.short_len, fs.long_len, batch_size)
    seqs = user_sequences(model, ds, num_users)
    if not module.reduction.built:
        model(next(iter(ds)))
    w = module.reduction.w_h.numpy()
    out = compare_projections(seqs, w, seed, triplets_per_seq)
    out.update({"model": getattr(model, "model_name", ""), "split": split,
                "reduced_dim": int(w.shape[1])})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lifelong encode-report`` (the report the ``encode`` registry entry declares)."""
    p.add_argument("--run", required=True, help="run directory of a trained encode* model")
    p.add_argument("--data", help="prepared dataset (default: the run's)")
    p.add_argument("--split", default="test")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)


def run(args, extra=None) -> int:
    print(json.dumps(triplet_order_preservation(args.run, args.data, args.split, args.users,
                                                seed=args.seed), indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
