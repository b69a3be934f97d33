"""Training under ``tf.distribute``: ``lifelong train --distribute none|mirrored|multi_worker``.

:func:`tfmodels.train.train` calls :func:`setup` first (before any TensorFlow op: a
``MultiWorkerMirroredStrategy`` must be created at program start-up) and then, for
``mirrored`` and ``multi_worker``, builds the model and optimizer inside
``Setup.scope()``, shards its input with :func:`shard_datasets`, and writes through
:meth:`Setup.write_dir` (docs/distributed.md has the whole story and how to run it on a
cluster).

* ``none`` (default): no strategy, exactly the training as before.
* ``mirrored``: ``tf.distribute.MirroredStrategy`` over the devices of one machine
  (several GPUs); each global batch is split across them.
* ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` over the workers that
  ``TF_CONFIG`` lists (synchronous data parallelism: every worker holds all weights,
  gradients are all-reduced every step). Every worker runs the same command.

``--batch_size`` is the GLOBAL batch under every strategy: one optimizer step consumes
``batch_size`` examples in all; each of the N replicas gets ``batch_size / N``.

Gradients are averaged over the replicas (:func:`mean_aggregating`): the model's loss
is a per-replica batch mean (its auxiliary ``add_loss`` terms too), so the mean of the
replicas' gradients is the gradient of the global batch's mean loss when the replicas'
batches have the same size, as in single-worker training with the same global batch
(tests/test_multiworker.py checks the weights against that).

Input sharding (``shard_policy``): ``file`` (default) sets tf.data's
``AutoShardPolicy.FILE`` on the training dataset of :func:`tfmodels.data.make_dataset`:
the strategy finds its list of TFRecord shards and gives worker i the files
i, i + N, i + 2N, ... (before the file shuffle), so each worker reads and decodes only
its own files. Chosen over an explicit ``shard(num_workers, index)`` on the file list
because ``make_dataset`` takes a file pattern, not a list, and it is owned by the
record-format code; the auto-shard rewrite reaches the file list inside it without
changing it. It needs at least as many files as workers (checked here, with a clear
error) and gives uneven work when files differ in size. ``data`` (AutoShardPolicy.DATA)
has every worker read all files and keep its share of each global batch: exactly the
single-worker batches (what the parity test uses), at N times the reading cost. The
validation split always uses ``data``: it is small, any number of files works, and the
validation AUC is then that of exactly the single-worker validation set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Dict, Optional, Tuple

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels.errors import LifelongError

STRATEGIES = ("none", "mirrored", "multi_worker")
SHARD_POLICIES = ("file", "data")


class DistributeError(ValueError, LifelongError):
    """A bad ``--distribute`` setting or ``TF_CONFIG`` (one line from the CLI)."""


def read_tf_config(environ: Optional[Dict[str, str]] = None) -> Dict:
    """``TF_CONFIG`` parsed and checked: ``cluster`` with a non-empty ``worker`` list of
    ``host:port`` and ``task`` ``{"type": "worker"|"chief", "index": i}`` in range."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not raw.strip():
        raise DistributeError(
            "--distribute multi_worker needs the TF_CONFIG environment variable on every "
            "worker, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
            "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' "
            "(docs/distributed.md)")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DistributeError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise DistributeError("TF_CONFIG has no cluster.worker list (the host:port of every "
                              f"worker); got {raw!r}")
    unknown = set(cluster) - {"worker", "chief"}
    if unknown:
        raise DistributeError(f"TF_CONFIG cluster has task types {sorted(unknown)}; "
                              "MultiWorkerMirroredStrategy takes only worker (and chief)")
    for kind, addresses in cluster.items():
        if (not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a
                                                       for a in addresses)):
            raise DistributeError(f"TF_CONFIG cluster.{kind} must be a list of 'host:port', "
                                  f"got {addresses!r}")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise DistributeError("TF_CONFIG task must be {\"type\": one of "
                              f"{sorted(cluster)}, \"index\": i}}; got {task!r}")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not (
            0 <= index < len(cluster[task["type"]])):
        raise DistributeError(f"TF_CONFIG task.index must be an integer in "
                              f"[0, {len(cluster[task['type']])}), got {index!r}")
    return config


def is_chief(config: Dict) -> bool:
    """The chief writes the run's files: the ``chief`` task if the cluster has one, else
    worker 0 (the TF multi-worker tutorial's rule)."""
    task_type, index = config["task"]["type"], config["task"]["index"]
    return task_type == "chief" or (task_type == "worker" and index == 0
                                    and "chief" not in config["cluster"])


@dataclasses.dataclass
class Setup:
    """The strategy of a run and this process's place in it."""
    name: str
    strategy: tf.distribute.Strategy
    num_workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    is_chief: bool = True

    @property
    def distributed(self) -> bool:
        return self.name != "none"

    @property
    def num_replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def scope(self):
        return self.strategy.scope() if self.distributed else contextlib.nullcontext()

    def write_dir(self, out_dir: str) -> str:
        """Where this process writes the run directory's files: ``out_dir`` on the chief;
        a worker's own ``out_dir/.tmp-<type>-<index>`` elsewhere. Every worker must
        still save (checkpoints read synced-on-read variables such as the AUC metric's
        with a collective all-reduce, so a save the other workers skip would hang):
        they save to these temporary directories, which :meth:`cleanup` removes
        (as in the TF multi-worker tutorial)."""
        if self.is_chief:
            return out_dir
        return os.path.join(out_dir, f".tmp-{self.task_type}-{self.task_index}")

    def cleanup(self, out_dir: str) -> None:
        path = self.write_dir(out_dir)
        if path != out_dir and tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)

    def describe(self) -> Dict:
        return {"strategy": self.name, "num_workers": self.num_workers,
                "num_replicas": self.num_replicas, "task_type": self.task_type,
                "task_index": self.task_index, "is_chief": self.is_chief}


# A process can create MultiWorkerMirroredStrategy once (it configures the collective
# ops of the eager context), so the strategy of a name is made once and reused.
_STRATEGIES: Dict[str, tf.distribute.Strategy] = {}


def setup(name: str = "none", environ: Optional[Dict[str, str]] = None) -> Setup:
    """The :class:`Setup` of ``--distribute NAME``; call it before any TensorFlow op."""
    if name not in STRATEGIES:
        raise DistributeError(f"--distribute must be one of {', '.join(STRATEGIES)}, "
                              f"got {name!r}")
    if name == "none":
        return Setup(name, tf.distribute.get_strategy())
    if name == "mirrored":
        if name not in _STRATEGIES:
            _STRATEGIES[name] = tf.distribute.MirroredStrategy()
        return Setup(name, _STRATEGIES[name])
    config = read_tf_config(environ)
    if name not in _STRATEGIES:
        try:
            # reads TF_CONFIG (TFConfigClusterResolver) and starts this worker's gRPC
            # server; collectives: AUTO (ring on CPU, NCCL on GPUs)
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise DistributeError(
                "could not start MultiWorkerMirroredStrategy (it must be created before "
                f"any TensorFlow op runs in the process): {e}") from e
    cluster = config["cluster"]
    return Setup(name, _STRATEGIES[name],
                 num_workers=sum(len(v) for v in cluster.values()),
                 task_type=config["task"]["type"], task_index=config["task"]["index"],
                 is_chief=is_chief(config))


def configure_model(model: tf.keras.Model, dist: Setup) -> None:
    """Under a strategy, report each step's outputs from the first replica.

    tf_keras's default (``distribute_reduction_method="auto"``, i.e. "sum" off TPUs)
    SUMS ``train_step``'s outputs over the workers of a MultiWorkerMirroredStrategy:
    the AUC metric, already synchronised over the replicas, came out N times too large
    (measured: 1.009 with 2 workers for a true 0.5045). "first" gives the synchronised
    metrics as they are; the logged ``loss`` is then the first replica's batch-mean loss
    (over ``batch_size / N`` examples), not the global batch's.
    """
    if dist.distributed:
        model.distribute_reduction_method = "first"


def check_config(dist: Setup, batch_size: int, steps_per_epoch: int, out_dir: str) -> None:
    """What a distributed run needs from the training config (errors name the fix)."""
    if not dist.distributed:
        return
    if batch_size % dist.num_replicas:
        raise DistributeError(
            f"--batch_size is the global batch and must split evenly over the "
            f"{dist.num_replicas} replicas; got {batch_size}")
    if dist.name == "multi_worker":
        if not steps_per_epoch:
            raise DistributeError(
                "--distribute multi_worker needs --steps_per_epoch > 0: workers read "
                "different files, so a 'full pass' would end at a different step on each "
                "worker; with a fixed number of global steps per epoch the training split "
                "repeats and every worker steps together")
        if not out_dir:
            raise DistributeError(
                "--distribute multi_worker needs --out_dir (the same directory on every "
                "worker, on storage they all can read: the chief writes there and every "
                "worker resumes from its checkpoints)")


def shard_options(policy: str) -> tf.data.Options:
    """tf.data options whose auto-shard policy is ``policy`` (:data:`SHARD_POLICIES`)."""
    if policy not in SHARD_POLICIES:
        raise DistributeError(f"shard policy must be one of {', '.join(SHARD_POLICIES)}, "
                              f"got {policy!r}")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.FILE if policy == "file"
        else tf.data.experimental.AutoShardPolicy.DATA)
    return options


def shard_datasets(dist: Setup, train_ds: tf.data.Dataset, valid_ds: Optional[tf.data.Dataset],
                   train_files: int, policy: str = "file"
                   ) -> Tuple[tf.data.Dataset, Optional[tf.data.Dataset]]:
    """Set the auto-shard policy the strategy applies when Keras ``fit`` distributes the
    datasets (see the module docstring): ``policy`` for training, ``data`` for
    validation. Unchanged without a multi-worker strategy (MirroredStrategy splits each
    batch over the devices of its one machine)."""
    options = shard_options(policy)
    if dist.name != "multi_worker":
        return train_ds, valid_ds
    if policy == "file" and train_files < dist.num_workers:
        raise DistributeError(
            f"--shard_policy file gives each worker whole TFRecord files, but the training "
            f"split has {train_files} file(s) for {dist.num_workers} workers: prepare the "
            f"data with at least {dist.num_workers} shards, or use --shard_policy data")
    train_ds = train_ds.with_options(options)
    if valid_ds is not None:
        valid_ds = valid_ds.with_options(shard_options("data"))
    return train_ds, valid_ds


def _divide(grad, n: int):
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):   # an embedding table's sparse gradient
        return tf.IndexedSlices(grad.values / n, grad.indices, grad.dense_shape)
    return grad / n


def mean_aggregating(optimizer: tf.keras.optimizers.Optimizer,
                     dist: Setup) -> tf.keras.optimizers.Optimizer:
    """``optimizer`` made to average (not sum) the replicas' gradients.

    Keras' own convention scales the loss by 1 / replicas inside ``compile``'s loss
    container; our model computes its loss itself (``tfrs.Model.train_step``: the
    task's batch-mean loss plus ``add_loss`` terms, all per-replica means), so the
    averaging is done where the gradients are all-reduced instead:
    ``Optimizer.aggregate_gradients`` is the extension point tf_keras documents for
    that ("Users can implement their own aggregation logic by overriding this method").
    Returned unchanged without a strategy or with a single replica.
    """
    if not dist.distributed or dist.num_replicas == 1:
        return optimizer
    base = type(optimizer)

    class MeanAggregating(base):
        def aggregate_gradients(self, grads_and_vars):
            reduced = super().aggregate_gradients(grads_and_vars)
            n = tf.distribute.get_replica_context().num_replicas_in_sync
            return [(_divide(g, n), v) for g, v in reduced]

    MeanAggregating.__name__ = MeanAggregating.__qualname__ = f"MeanAggregating{base.__name__}"
    return MeanAggregating.from_config(optimizer.get_config())
