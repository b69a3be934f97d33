"""Multi-worker training (``lifelong train --distribute multi_worker``, tfmodels/distribute.py).

The two-worker test starts two worker processes on localhost (free ports, a TF_CONFIG
each; this file is their entry point) that train a tiny DIN under
MultiWorkerMirroredStrategy, and checks them against single-worker training in this
process with the same global batch:

* ``--shard_policy data`` (each global batch split in halves over the workers: the same
  examples per step as one worker): the final weights after 3 steps, a ``--resume`` to a
  second epoch (every worker restarts from the chief's checkpoint) and 3 more steps equal
  the single-worker run's (1 epoch, then resumed to 2) within ``WEIGHT_TOL``; Adagrad,
  whose step is not invariant to the gradient's scale, so summing the two workers'
  gradients instead of averaging them would fail this; the validation AUC each epoch is
  the single-worker one (not 2x: tf_keras sums step outputs over workers by default);
* ``--shard_policy file`` (the default) is not run here (each more training costs ~30 s
  of CPU in the two processes): which files each worker reads under it is checked
  in-process below (the rewrite the strategy applies), and docs/distributed.md's
  benchmark runs it end to end.

The trainings run their ``tf.function``s eagerly (tracing dominated these 6 tiny steps;
the collectives and the gradient averaging run all the same; the graph-mode path ran in
docs/distributed.md's benchmark). Skipped, with the worker's error, only when the localhost collective cannot start (a
gRPC server that cannot bind or reach its peer); any other worker failure fails.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import distribute as DIST
from tfmodels import train as T

pytestmark = pytest.mark.filterwarnings(
    "ignore:Even though the `tf.config.experimental_run_functions_eagerly`:UserWarning")
HARD_TIMEOUT_S = 240   # both workers together (measured 181-186 s at load 12-15, 2 cores)
# float32: the mean of the two half-batch gradients is the full-batch mean gradient up
# to rounding (~1e-7 relative); 6 Adagrad steps at lr 0.05 measured a max |diff| of
# 3e-8 here, while summing instead of averaging the gradients moves weights by far
# more (docs/distributed.md).
WEIGHT_TOL = 1e-4
AUC_TOL = 1e-3          # the same predictions up to rounding; AUC's threshold buckets


def _config(data, out_dir, epochs, steps=3):
    return T.TrainConfig(data=data, model="din", out_dir=out_dir, short_len=5, long_len=24,
                         emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4], batch_size=16,
                         epochs=epochs, steps_per_epoch=steps, learning_rate=0.05,
                         optimizer="adagrad", early_stopping_patience=0, shuffle_buffer=64,
                         verbose=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _weights(run_dir):
    """final/ weights as numpy arrays by checkpoint key (built from one test batch)."""
    reader = tf.train.load_checkpoint(os.path.join(run_dir, "final", "weights"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "/.ATTRIBUTES/VARIABLE_VALUE" in k and "_metrics" not in k
            and "keras_api" not in k}


def worker_main(data, out_root):
    """One worker: the DATA-sharded run (1 epoch), then its --resume to epoch 2."""
    tf.config.run_functions_eagerly(True)   # tracing would dominate these 6 tiny steps
    parity = os.path.join(out_root, "data")
    T.train(_config(data, parity, 1), distribute="multi_worker", shard_policy="data")
    T.train(_config(data, parity, 2), resume=True, distribute="multi_worker",
            shard_policy="data")
    print("WORKER-DONE", flush=True)


# Errors that mean the localhost cluster itself could not come up (not our code).
COLLECTIVE_START_ERRORS = ("Failed to bind", "Address already in use", "failed to connect",
                           "Connection refused", "UNAVAILABLE: ")


def _run_workers(data, out_root):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    procs = []
    for i in range(2):
        env_i = dict(env, TF_CONFIG=json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), data, out_root], env=env_i,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline, outs = time.monotonic() + HARD_TIMEOUT_S, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two-worker training did not finish in {HARD_TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0 or "WORKER-DONE" not in out:
            if any(e in out for e in COLLECTIVE_START_ERRORS) and "[train] model=" not in out:
                pytest.skip(f"the localhost collective could not start: worker {i} said "
                            f"{out[-800:]}")
            pytest.fail(f"worker {i} failed (exit {p.returncode}):\n{out[-4000:]}")
    return outs


def test_two_workers_match_single_worker_training_and_resume(tiny_data, tmp_path):
    t0 = time.monotonic()
    out_root = str(tmp_path / "multi")
    outs = _run_workers(tiny_data, out_root)
    workers_s = time.monotonic() - t0

    single = str(tmp_path / "single")
    tf.config.run_functions_eagerly(True)   # as the workers run
    try:
        first = T.train(_config(tiny_data, single, 1))
        second = T.train(_config(tiny_data, single, 2), resume=True)
    finally:
        tf.config.run_functions_eagerly(False)

    parity = os.path.join(out_root, "data")
    with open(os.path.join(parity, "run.json")) as f:
        multi = json.load(f)
    assert multi["distribute"]["num_workers"] == 2 and multi["distribute"]["is_chief"]
    assert multi["distribute"]["global_batch"] == 16 and multi["stopped_epoch"] == 2
    # both workers resumed at epoch 1 from the chief's checkpoint
    for out in outs:
        assert "at epoch 1" in out and os.path.join(parity, "ckpt") in out, out[-2000:]
    # the non-chief's temporary run directory is gone
    assert not [n for n in os.listdir(parity) if n.startswith(".tmp-")]

    got, want = _weights(parity), _weights(single)
    assert sorted(got) == sorted(want) and len(want) > 5
    gap = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    moved = max(float(np.max(np.abs(want[k]))) for k in want)
    assert gap <= WEIGHT_TOL, f"max |w_2workers - w_1worker| = {gap:.2e}"
    assert moved > 10 * WEIGHT_TOL   # the weights are not trivially equal (zero)
    # the validation AUC of the resumed epoch = the single worker's, not summed over
    # the two workers
    assert multi["history"]["val_auc"] == pytest.approx(second["history"]["val_auc"],
                                                         abs=AUC_TOL)
    # the resumed call trained epoch 2 only; its history covers epochs 1-2 (epochs.jsonl)
    assert first["stopped_epoch"] == 1 and second["resumed_at_epoch"] == 1
    assert second["history_epochs"] == multi["history_epochs"] == [1, 2]
    assert second["history"]["val_auc"][0] == first["history"]["val_auc"][0]
    print(f"two workers: {workers_s:.0f} s (start-up, 2 trainings each); max weight gap "
          f"{gap:.2e}")


def _users(ds):
    return sorted({int(u) for b in ds for u in b["user_id"].numpy()})


def test_file_policy_gives_each_worker_its_own_files(tiny_data):
    """The FILE auto-shard rewrite the strategy applies (the function its input
    pipeline calls) gives worker i the users of file i only."""
    from tensorflow.python.distribute import input_ops   # what MWMS's input lib calls
    from tfmodels import data as D
    from tfmodels import schema as S
    files = D.list_files(S.split_pattern(tiny_data, "train"))
    assert len(files) == 2
    per_file = [_users(D.make_dataset(f, 5, 24, 8)) for f in files]
    dist = DIST.Setup("multi_worker", tf.distribute.get_strategy(), num_workers=2)
    seen = []
    for index in range(2):
        ds, _ = DIST.shard_datasets(dist, D.make_dataset(S.split_pattern(tiny_data, "train"),
                                                         5, 24, 8, shuffle=True, seed=1,
                                                         shuffle_buffer=16), None, 2, "file")
        seen.append(_users(input_ops.auto_shard_dataset(ds, 2, index, 2)))
    assert seen == per_file and not set(seen[0]) & set(seen[1]) and seen[0]


def test_file_policy_needs_a_file_per_worker(tiny_data):
    ds = tf.data.Dataset.range(4)
    dist = DIST.Setup("multi_worker", tf.distribute.get_strategy(), num_workers=3)
    with pytest.raises(DIST.DistributeError, match="2 file.*3 workers.*--shard_policy data"):
        DIST.shard_datasets(dist, ds, None, 2, "file")
    out, _ = DIST.shard_datasets(dist, ds, None, 2, "data")
    assert (out.options().experimental_distribute.auto_shard_policy
            == tf.data.experimental.AutoShardPolicy.DATA)


def _env(config):
    return {"TF_CONFIG": config if isinstance(config, str) else json.dumps(config)}


CLUSTER = {"worker": ["localhost:1", "localhost:2"]}


@pytest.mark.parametrize("config, message", [
    ("", "needs the TF_CONFIG environment variable"),
    ("{not json", "not valid JSON"),
    ({"cluster": {}, "task": {"type": "worker", "index": 0}}, "no cluster.worker list"),
    ({"cluster": dict(CLUSTER, ps=["localhost:3"]), "task": {"type": "worker", "index": 0}},
     r"task types \['ps'\]"),
    ({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}},
     "list of 'host:port'"),
    ({"cluster": CLUSTER, "task": {"type": "evaluator", "index": 0}}, "task must be"),
    ({"cluster": CLUSTER, "task": {"type": "worker", "index": 2}}, r"in \[0, 2\), got 2"),
])
def test_bad_tf_config_is_rejected(config, message):
    with pytest.raises(DIST.DistributeError, match=message):
        DIST.read_tf_config(_env(config))


def test_chief_is_worker_0_unless_the_cluster_has_a_chief():
    def chief(cluster, kind, index):
        return DIST.is_chief(DIST.read_tf_config(_env(
            {"cluster": cluster, "task": {"type": kind, "index": index}})))
    assert chief(CLUSTER, "worker", 0) and not chief(CLUSTER, "worker", 1)
    with_chief = dict(CLUSTER, chief=["localhost:3"])
    assert chief(with_chief, "chief", 0) and not chief(with_chief, "worker", 0)


def test_multi_worker_config_checks():
    dist = DIST.Setup("multi_worker", tf.distribute.get_strategy(), num_workers=2)
    # one replica here (the default strategy); the global batch check uses num_replicas
    DIST.check_config(dist, 16, 3, "/out")
    with pytest.raises(DIST.DistributeError, match="needs --steps_per_epoch > 0"):
        DIST.check_config(dist, 16, 0, "/out")
    with pytest.raises(DIST.DistributeError, match="needs --out_dir"):
        DIST.check_config(dist, 16, 3, "")
    with pytest.raises(DIST.DistributeError, match="must be one of none, mirrored"):
        DIST.setup("horovod")
    assert DIST.setup("none").describe()["num_workers"] == 1


def test_cli_multi_worker_without_tf_config_is_one_line(tiny_data, monkeypatch, capsys):
    from lifelong import cli
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cli.main(["train", "--data", tiny_data, "--model", "din", "--out_dir", "/tmp/x",
                     "--steps_per_epoch", "1", "--config_dir", "none",
                     "--distribute", "multi_worker"]) == 2
    err = capsys.readouterr().err
    assert "error: --distribute multi_worker needs the TF_CONFIG environment variable" in err
    assert "Traceback" not in err


def test_model_loss_is_the_batch_mean_bce(tiny_data):
    """The task loss (reduction NONE so that it runs under a strategy) is still the
    batch mean of the binary cross-entropy, computed by hand here."""
    from tfmodels import data as D
    from tfmodels import schema as S
    cfg = _config(tiny_data, "", 1)
    model = T.model_from_config(cfg, T.feature_schema_for(cfg))
    batch = next(iter(D.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 16)))
    z = model(batch, training=False).numpy().astype(np.float64)
    y = batch["label"].numpy().astype(np.float64)
    want = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    assert float(model.compute_loss(batch)) == pytest.approx(want, rel=1e-5)


if __name__ == "__main__":   # a worker process of the two-worker test
    worker_main(sys.argv[1], sys.argv[2])
