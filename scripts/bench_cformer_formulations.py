"""C-Former precompute before/after in ONE process: the SavedModel bakes the
formulation in, so the reference formulation (CFormer.user_cache_reference, the code
before issue 19's encoder work) is exported beside the new one (and the new one under
XLA), and each export runs through the same precompute pipelines as
`lifelong bench precompute` (DirectRunner, one worker): ONE user (start-up) and N
users; steady users/s = (N - 1) / (wall - start-up wall). Issue 19 item 1's
before/after figures in docs/benchmarks.md ("User-cache precompute throughput") come
from it. A script, not a `lifelong bench` mode: it swaps a method's implementation in
process, which a user-facing command should not do. Usage:
  .venv/bin/python scripts/bench_cformer_formulations.py OUT N [ROUNDS [VARIANTS]]
VARIANTS: comma-separated row numbers of the table (0 = the earlier engine, which is
always run as the baseline; 5 = today's default path), e.g. ``0,5``; all six by default.
N: 2,000 or more (steady state is the difference of two runs' wall times; with a
few users it is noise, even negative).

The record parse is baked in too: the rows of parse "map_fn" are exported with
``tfmodels.data.user_history_features_map_fn`` (one parse per record through tf.map_fn,
the user tower's parse before issue 19's batched one), those of parse "batched" with
today's ``user_history_features`` (one tf.io.parse_example per batch). Per row it also prints the ``user_tower`` signature
alone on the same records (batches of 64: the TensorFlow compute) and the rest of the
steady CPU per user (the pipeline overhead); after the Beam rounds, a second table times
the batched engine's per-batch work without Beam (read, record_key, user_tower,
NumPy + encode), which has no start-up in it."""
import argparse, json, os, sys
import tfmodels  # noqa: F401
from beam_jobs import precompute as P
from lifelong.bench.precompute import _records_file, _first_records, _tower_cost
from lifelong.bench.workload import untrained_model
from serving.export import export_model
from tfmodels import data as D
from tfmodels.methods.cformer import CFormer

print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]), flush=True)
out_dir, n = sys.argv[1], int(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 1
L = 1000
args = argparse.Namespace(seed=0, short_len=50, emb_dim=8, mlp_hidden="32,16", din_hidden="16,8")
work = os.path.join(out_dir, "work"); base = os.path.join(work, "saved_models")
os.makedirs(base, exist_ok=True)
rec = _records_file(work, n, L, 0)
one = _first_records(rec, 1, os.path.join(work, f"one-L{L}-s0.tfrecord.gz"))
fast, batched_parse = CFormer.user_cache, D.user_history_features
# (formulation, engine, XLA user tower, record parse)
variants = [("reference", "runinference", False, "map_fn"), ("reference", "batched", False, "map_fn"),
            ("new", "batched", False, "map_fn"), ("new", "batched", True, "map_fn"),
            ("new", "batched", False, "batched"), ("new", "batched", True, "batched")]
if len(sys.argv) > 4:
    keep = sorted({0} | {int(i) for i in sys.argv[4].split(",")})
    if keep[-1] >= len(variants) or keep[0] < 0:
        sys.exit(f"VARIANTS: row numbers 0-{len(variants) - 1}, got {sys.argv[4]!r}")
    variants = [variants[i] for i in keep]
export_name = lambda form, xla, parse: f"cformer_{form}{'_xla' * xla}_{parse}"
for form, xla, parse in sorted({(f, x, p) for f, _, x, p in variants}):
    CFormer.user_cache = CFormer.user_cache_reference if form == "reference" else fast
    D.user_history_features = D.user_history_features_map_fn if parse == "map_fn" else batched_parse
    export_model(untrained_model(args, "cformer", L), base, export_name(form, xla, parse), 1,
                 jit_user_tower=xla)
CFormer.user_cache, D.user_history_features = fast, batched_parse

def run(name, recs, output, engine):
    ns = argparse.Namespace(records=recs, model=name, base=base, version=1, model_dir=None,
                            output=os.path.join(work, f"{name}-{output}"), num_shards=1,
                            no_reshuffle=False, store=None, engine=engine, batch_size=64,
                            cache_compression="none")
    return P.run(ns, ["--direct_num_workers=1"])

run(export_name("reference", False, "map_fn"), one, "warmup", "batched")
rows = []
load0 = os.getloadavg()[0]
for r in range(rounds):
    for form, engine, xla, parse in variants:
        name = export_name(form, xla, parse)
        tower = _tower_cost(os.path.join(base, name, "1"), rec, 64)
        s = run(name, one, f"{engine}-one", engine)
        f = run(name, rec, f"{engine}-full", engine)
        net, cpu = f["wall_s"] - s["wall_s"], f["cpu_s"] - s["cpu_s"]
        row = {"round": r, "formulation": form, "engine": engine, "xla": xla, "parse": parse,
               "users": f["users"], "steady_users_per_s": (f["users"] - 1) / net,
               "startup_s": s["wall_s"], "steady_cpu_ms_per_user": cpu / (f["users"] - 1) * 1e3,
               **tower, "load": os.getloadavg()[0]}
        row["other_cpu_ms_per_user"] = row["steady_cpu_ms_per_user"] - row["tower_cpu_ms_per_user"]
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump({"rows": rows, "load_start": load0, "load_end": os.getloadavg()[0]},
          open(os.path.join(out_dir, "results.json"), "w"), indent=1)

base_ups = None
print("| formulation | engine | xla | parse | steady users/s (median; rounds) | vs earlier engine "
      "| steady CPU ms/user (median; rounds) | user_tower CPU ms/user | other CPU ms/user "
      "| start-up s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for form, engine, xla, parse in variants:
    got = [r for r in rows if (r["formulation"], r["engine"], r["xla"], r["parse"])
           == (form, engine, xla, parse)]
    med = lambda k: sorted(r[k] for r in got)[len(got) // 2]
    each = lambda k, f: ", ".join(f.format(r[k]) for r in got)
    ups = med("steady_users_per_s")
    base_ups = base_ups or ups     # the first variant: the earlier engine
    print(f"| {form} | {engine} | {xla} | {parse} | {ups:.0f} ({each('steady_users_per_s', '{:.0f}')}) "
          f"| {ups / base_ups:.2f}x | {med('steady_cpu_ms_per_user'):.2f} "
          f"({each('steady_cpu_ms_per_user', '{:.2f}')}) | {med('tower_cpu_ms_per_user'):.2f} "
          f"| {med('other_cpu_ms_per_user'):.2f} | {med('startup_s'):.1f} |")
print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")

# The batched engine's per-batch work WITHOUT Beam, same process and records: what
# RefreshBucket does per chunk (read the file, record_key of every record, then per batch
# of 64 the user_tower call, outputs to NumPy, encode_cache_batch). Steady CPU through Beam
# subtracts a one-user run that loads the SavedModel and (XLA) compiles again: seconds of
# CPU that vary by about one second under load, i.e. tenths of a ms per user; this split
# has no start-up in it.
import time
import numpy as np
import tensorflow as tf
from beam_jobs import precompute_batched as PB


def direct_pass(fn, bs=64):
    cpu = {"read": 0.0, "record_key": 0.0, "user_tower": 0.0, "numpy_encode": 0.0}
    t = time.process_time(); recs = list(PB._tfrecords(rec)); cpu["read"] += time.process_time() - t
    t = time.process_time(); keys = [PB.record_key(x) for x in recs]
    cpu["record_key"] += time.process_time() - t
    for i in range(0, len(recs), bs):
        part, meta = recs[i:i + bs], keys[i:i + bs]
        part += part[-1:] * (bs - len(part)); meta += meta[-1:] * (bs - len(meta))
        t = time.process_time(); res = fn(records=tf.constant(part))
        cpu["user_tower"] += time.process_time() - t
        t = time.process_time()
        PB.encode_cache_batch("cformer", 1, {k: v.numpy() for k, v in res.items()},
                              [m[1] for m in meta], [m[2] for m in meta])
        cpu["numpy_encode"] += time.process_time() - t
    return {k: v / len(recs) * 1e3 for k, v in cpu.items()}


direct_variants = [v for v in variants if v[1] == "batched"]
fns = {v: tf.saved_model.load(os.path.join(base, export_name(v[0], v[2], v[3]), "1"))
       .signatures["user_tower"] for v in direct_variants}
first = tf.constant([x for _, x in zip(range(64), PB._tfrecords(rec))])
for fn in fns.values():
    fn(records=first)                                   # (XLA: compiled here, untimed)
direct = []
for r in range(rounds):
    for v, fn in fns.items():
        direct.append({"round": r, "formulation": v[0], "xla": v[2], "parse": v[3],
                       **direct_pass(fn), "load": os.getloadavg()[0]})
        print(json.dumps(direct[-1]), flush=True)
json.dump({"rows": rows, "direct": direct, "load_start": load0, "load_end": os.getloadavg()[0]},
          open(os.path.join(out_dir, "results.json"), "w"), indent=1)
parts = ("read", "record_key", "user_tower", "numpy_encode")
print("\nWithout Beam (median CPU ms/user over the rounds):")
print("| formulation | xla | parse | read | record_key | user_tower | NumPy + encode | total |")
print("|---|---|---|---|---|---|---|---|")
for v in direct_variants:
    got = [d for d in direct if (d["formulation"], d["xla"], d["parse"]) == (v[0], v[2], v[3])]
    med = {k: float(np.median([d[k] for d in got])) for k in parts}
    print(f"| {v[0]} | {v[2]} | {v[3]} | " + " | ".join(f"{med[k]:.3f}" for k in parts)
          + f" | {sum(med.values()):.3f} |")
print(f"load average at the end: {os.getloadavg()[0]:.1f}")
