"""The serving top-k selection alone (issue 20 item 6): what the per-candidate top-k of
SIM soft, ETA, TWIN / TWIN V2 and LCN costs on CPU, and the exact alternatives tried.

One user's window ranked for N = 100 candidates is scored as 112 rows (the fine XLA
bucket) of L = 1,000 keys; each variant returns the selected set of every row and is
checked against ``tf.math.top_k`` (same set, ties to the lower index), then timed as
one ``tf.function`` call (wall p50 and CPU per call over REPS calls, after a warm-up):

* ``xla top_k``: ``tf.math.top_k`` under XLA on the raw keys;
* ``xla prefiltered top_k``: today's serving path (:func:`tfmodels.methods.esu.prefiltered_top_k`);
* ``xla top_k, 2 row halves``: two independent TopK ops in one cluster (does XLA:CPU run
  them on the two cores?);
* ``xla prefilter | TF top_k | xla``: the prefilter and a consumer compiled, TensorFlow's
  own TopKV2 kernel (which splits rows over the intra-op threads) between them;
* ``xla radix select``: an exact selection without a sort: 32 compare-and-count passes
  over the order-preserving uint32 image of the keys find each row's k-th largest key,
  then 10 passes over the positions of the keys tied with it keep the lower indices;
  returns the selection as a mask (the ESU would then attend densely over L).

Keys: ``normal`` (distinct floats) and ``int`` (-randint(0, 30): many ties, as ETA's
Hamming distances). A script, not a ``lifelong bench`` mode: it measures one kernel, not
the package. Usage: .venv/bin/python scripts/bench_topk_selection.py [REPS [PNG]]
(PNG: also draw the wall p50s as grouped bars, one group per keys x k)."""
import os
import sys
import time

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.methods.esu import prefilter, prefiltered_top_k

print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
PNG = sys.argv[2] if len(sys.argv) > 2 else None
N, L = 112, 1000


def sortable(x):
    """uint32 image of float32 keys in the same order (-0 taken as +0)."""
    i = tf.bitcast(x + 0.0, tf.int32)
    u = tf.where(i < 0, tf.bitwise.invert(i), tf.bitwise.bitwise_xor(i, tf.constant(-2**31, tf.int32)))
    return tf.bitcast(u, tf.uint32)


def radix_mask(x, k):
    u = sortable(x)
    t = tf.zeros([tf.shape(x)[0], 1], tf.uint32)
    for b in range(31, -1, -1):              # the largest t with count(u >= t) >= k
        cand = t | tf.constant(np.uint32(1 << b))
        t = tf.where(tf.reduce_sum(tf.cast(u >= cand, tf.int32), 1, keepdims=True) >= k, cand, t)
    gt = u > t
    need = k - tf.reduce_sum(tf.cast(gt, tf.int32), 1, keepdims=True)
    tie = u == t
    idx = tf.range(L, dtype=tf.int32)[None, :]
    p = tf.zeros_like(need)
    for b in range(int(np.ceil(np.log2(L))) - 1, -1, -1):   # the need-th tie's position
        cand = p | (1 << b)
        cnt = tf.reduce_sum(tf.cast(tie & (idx < cand), tf.int32), 1, keepdims=True)
        p = tf.where(cnt < need, cand, p)
    return gt | (tie & (idx <= p))


def as_mask(out: np.ndarray) -> np.ndarray:
    """A variant's output (indices [N, k] or a mask [N, L]) as a mask, for the check."""
    if out.dtype == bool:
        return out
    m = np.zeros((out.shape[0], L), bool)
    np.put_along_axis(m, out.astype(np.int64), True, 1)
    return m


def timed(f, x):
    for _ in range(20):
        f(x)
    walls, c0 = [], time.process_time()
    for _ in range(REPS):
        t0 = time.perf_counter()
        f(x).numpy()
        walls.append(time.perf_counter() - t0)
    return np.median(walls) * 1e3, (time.process_time() - c0) / REPS * 1e3


valid = tf.ones([1, L], tf.bool)
rs = np.random.RandomState(0)
rows = []
print("| keys | k | variant | exact | wall p50 ms | CPU ms per call |")
print("|---|---|---|---|---|---|")
for kind in ("normal", "int"):
    x = tf.constant(rs.randn(N, L).astype(np.float32) if kind == "normal"
                    else -rs.randint(0, 30, (N, L)).astype(np.float32))
    for k in (50, 100, 200):
        ref = as_mask(tf.math.top_k(x, k)[1].numpy())
        post = tf.function(lambda i: i + 0, jit_compile=True)
        pre = tf.function(lambda x: prefilter(x, k, valid), jit_compile=True)
        variants = {
            "xla (no selection: the call's floor)": (tf.function(lambda x: tf.cast(x[:, :k], tf.int32) * 0 + tf.range(k)[None], jit_compile=True), False),
            "xla top_k": (tf.function(lambda x: tf.math.top_k(x, k)[1], jit_compile=True), True),
            "xla prefiltered top_k (serving today)": (tf.function(lambda x: prefiltered_top_k(x, k, valid), jit_compile=True), True),
            "xla top_k, 2 row halves": (tf.function(lambda x: tf.concat(
                [tf.math.top_k(x[:N // 2], k)[1], tf.math.top_k(x[N // 2:], k)[1]], 0), jit_compile=True), True),
            "xla prefilter, TF top_k, xla": (tf.function(lambda x: post(tf.math.top_k(pre(x), k)[1])), True),
            "xla radix select (mask)": (tf.function(lambda x: radix_mask(x, k), jit_compile=True), True),
        }
        for name, (f, check) in variants.items():
            got = as_mask(f(x).numpy())
            exact = bool((got == ref).all()) if check else "-"
            wall, cpu = timed(f, x)
            print(f"| {kind} | {k} | {name} | {exact} | {wall:.3f} | {cpu:.3f} |", flush=True)
            rows.append((f"{kind}, k = {k}", name, wall))
print(f"load average at the end: {os.getloadavg()[0]:.1f}")
if PNG:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(g for g, _, _ in rows))
    names = list(dict.fromkeys(n for _, n, _ in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for j, name in enumerate(names):
        ys = [next(w for g2, n, w in rows if g2 == g and n == name) for g in groups]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))], ys,
               width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("wall p50 per call, ms")
    ax.set_title(f"Top-k selection of one user's window for N = 100 candidates ({N} rows), "
                 f"L = {L}, {REPS} calls")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, "command: " + " ".join(["python", *sys.argv]), fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(PNG, dpi=110)
    print(f"plot: {PNG}")
