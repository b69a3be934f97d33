"""Training and evaluation: Keras ``fit`` on tf.data windows, checkpoints, resume, metrics.

A run directory holds::

    config.json     the full resolved config (flags > config file > defaults)
    run.json        seed, package versions, git commit, data summary, history, timings,
                    stopped_epoch / best_epoch / best_val_auc / final_epoch
    ckpt/           tf.train.Checkpoint of model + optimizer + epoch + early-stopping
                    state (best val AUC, best epoch, patience counter) for --resume;
                    ckpt/best/epoch-<N>: the weights of the best epoch so far
    final/          the weights of the best validation-AUC epoch of the whole run,
                    across --resume (the last epoch without a validation split or
                    with early stopping off)
    epochs.jsonl    one line per finished epoch (its logs, wall and training examples/s),
                    kept across --resume so that run.json's history, wall time and
                    speed cover the whole run, not only the last ``train`` call
    tb/             TensorBoard logs
    metrics-<split>.json   written by :func:`evaluate`
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional

import numpy as np

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import distribute as DIST
from tfmodels import metrics as M
from tfmodels import registry
from tfmodels import schema as S
from tfmodels.layers import DIN_PATHS, din_path_for_jit, set_din_path
from tfmodels.model import LifelongCTRModel, build_model
from tfmodels.errors import LifelongError


class ConfigError(ValueError, LifelongError):
    """A bad training/evaluation configuration (reported as one line by the CLI)."""


JIT_CHOICES = ("auto", "on", "off")
#: What ``jit_compile="auto"`` resolves to. Decided by measurement (docs/benchmarks.md,
#: "Training speed paths"): on the 2-core CPU machine XLA made DIN-L's training step
#: slower (B 256, L 1,000), so auto = off. Not measured on a GPU (the device machines
#: lent here have no TensorFlow), so auto = off there too until someone measures it.
JIT_AUTO = "off"


def resolve_jit_compile(choice: str) -> bool:
    """``auto`` | ``on`` | ``off`` -> the ``jit_compile`` argument of ``Model.compile``."""
    if choice not in JIT_CHOICES:
        raise ConfigError(f"jit_compile must be one of {', '.join(JIT_CHOICES)}, got "
                          f"{choice!r}")
    return (JIT_AUTO if choice == "auto" else choice) == "on"


def traced_din_path(cfg: "TrainConfig") -> str:
    """The DIN layout a run's functions are traced with: ``cfg.din_path``, except that
    "valid" (a data-dependent number of rows) becomes "folded" under XLA."""
    return din_path_for_jit(cfg.din_path, resolve_jit_compile(cfg.jit_compile))


@dataclasses.dataclass
class TrainConfig:
    data: str = ""                       # a prepared dataset directory (lifelong prepare)
    model: str = "din"
    out_dir: str = ""
    seed: int = 0
    short_len: int = 50
    long_len: int = 1000
    emb_dim: int = 16
    mlp_hidden: List[int] = dataclasses.field(default_factory=lambda: [200, 80])
    din_hidden: List[int] = dataclasses.field(default_factory=lambda: [80, 40])
    # G2's DIN sums un-normalised weights; "softmax" (the flag the spec allows) is the
    # default here because the un-normalised form did not learn the planted
    # interests on the synthetic benchmark (docs/benchmarks.md). "none" = paper's form.
    din_normalize: str = "softmax"
    use_user_embedding: bool = False
    use_context: bool = False
    # BatchNorm before each hidden activation of the head MLP (the LREA paper's head,
    # METHODS 2.3 R4); off by default (METHODS 1.3's head has none).
    head_batchnorm: bool = False
    # Cross-domain windows (short_t / short_s / source-only long; needs two-domain data)
    # and LCN's CRP loss on top of any model (docs/cross_domain.md): crp_weight is
    # lambda_CRP (0 = off; the paper's value is 0.1), crp_negatives M per kind, crp_tau.
    cross_domain: bool = False
    crp_weight: float = 0.0
    crp_negatives: int = 4096
    crp_tau: float = 0.1
    # lambda_PT, lambda_PS, lambda_PC of L_CRP (N6); (1, 1, 0) = the paper's Table 1 row
    # "L_PT + L_PS only" (LCN without the cross-domain pair loss)
    crp_lambdas: List[float] = dataclasses.field(default_factory=lambda: [1.0, 1.0, 1.0])
    long_module_config: Dict = dataclasses.field(default_factory=dict)
    batch_size: int = 256
    epochs: int = 3
    steps_per_epoch: int = 0             # 0 = one pass over the training split
    learning_rate: float = 1e-3
    optimizer: str = "adam"              # adam | adagrad
    early_stopping_patience: int = 2     # epochs without val AUC gain; 0 = off
    shuffle_buffer: int = 20000
    eval_split: str = "test"
    group_key: str = "user_id"
    verbose: int = 1                     # Keras progress bar: 1 bar, 2 one line/epoch, 0 off
    # Speed only (issue 22 item 6; same function up to float rounding, docs/benchmarks.md
    # "Training speed paths"): XLA for the training step, "auto" = off (measured slower
    # on CPU, see JIT_AUTO); the DIN unit's layout (tfmodels.layers.DIN_PATHS; "valid" =
    # the attention MLP over the valid (non-padded) behavior rows only, "folded" = one
    # d x h0 product per behavior row, "per_candidate" = the layout before); the input
    # pipeline (tfmodels.data.PIPELINES; "legacy" = the pipeline before).
    jit_compile: str = "auto"
    din_path: str = "valid"
    input_pipeline: str = "parallel"


    #: the fields above that change how fast a run trains, not what it trains (tested equal
    #: up to float rounding in tests/test_train_speed_paths.py): ``compare --resume``
    #: reuses a finished run whatever its values were
    SPEED_ONLY = ("jit_compile", "din_path", "input_pipeline")

    def validate(self) -> "TrainConfig":
        if not self.data:
            raise ConfigError("--data is required (a directory written by `lifelong prepare`)")
        if self.model not in registry.MODELS:
            raise ConfigError(f"unknown model {self.model!r}; registered: "
                              f"{', '.join(registry.names())}")
        for name in ("short_len", "long_len", "emb_dim", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in ("adam", "adagrad"):
            raise ConfigError(f"optimizer must be adam or adagrad, got {self.optimizer!r}")
        if self.din_normalize not in ("softmax", "none"):
            raise ConfigError(f"din_normalize must be softmax or none, got {self.din_normalize!r}")
        if self.crp_weight < 0 or self.crp_tau <= 0 or self.crp_negatives < 1:
            raise ConfigError(f"need crp_weight >= 0, crp_tau > 0 and crp_negatives >= 1, got "
                              f"{self.crp_weight}, {self.crp_tau}, {self.crp_negatives}")
        lambdas = self.crp_lambdas
        if (not isinstance(lambdas, (list, tuple)) or len(lambdas) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
                           for x in lambdas)):
            raise ConfigError(f"crp_lambdas must be 3 numbers >= 0 (lambda_PT, lambda_PS, "
                              f"lambda_PC), e.g. 1,1,0; got {lambdas!r}")
        if self.crp_weight > 0 and not self.cross_domain:
            raise ConfigError("--crp_weight needs --cross_domain: CRP's pairs come from the "
                              "per-domain short windows (short_t, short_s)")
        if self.jit_compile not in JIT_CHOICES:
            raise ConfigError(f"jit_compile must be one of {', '.join(JIT_CHOICES)}, got "
                              f"{self.jit_compile!r}")
        if self.din_path not in DIN_PATHS:
            raise ConfigError(f"din_path must be one of {', '.join(DIN_PATHS)}, got "
                              f"{self.din_path!r}")
        if self.input_pipeline not in D.PIPELINES:
            raise ConfigError(f"input_pipeline must be one of {', '.join(D.PIPELINES)}, got "
                              f"{self.input_pipeline!r}")
        if self.eval_split not in S.SPLITS:
            raise ConfigError(f"eval_split must be one of {S.SPLITS}, got {self.eval_split!r}")
        return self

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


def load_config_file(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None


# ---- run metadata -------------------------------------------------------------------------
def package_versions() -> Dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("tensorflow", "tf-keras", "tensorflow-recommenders", "numpy", "apache-beam",
                "tfx-bsl", "tensorflow-serving-api", "lifelong-ctr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


# ---- model construction --------------------------------------------------------------------
def feature_schema_for(cfg: TrainConfig) -> S.FeatureSchema:
    return S.FeatureSchema.from_data_dir(cfg.data, cfg.short_len, cfg.long_len,
                                         cross_domain=cfg.cross_domain)


def model_from_config(cfg: TrainConfig, feature_schema: S.FeatureSchema) -> LifelongCTRModel:
    return build_model(feature_schema, cfg.model, emb_dim=cfg.emb_dim,
                       mlp_hidden=cfg.mlp_hidden, din_hidden=cfg.din_hidden,
                       din_normalize=None if cfg.din_normalize == "none" else cfg.din_normalize,
                       use_user_embedding=cfg.use_user_embedding, use_context=cfg.use_context,
                       head_batchnorm=cfg.head_batchnorm,
                       crp_weight=cfg.crp_weight, crp_negatives=cfg.crp_negatives,
                       crp_tau=cfg.crp_tau, crp_lambdas=cfg.crp_lambdas, crp_seed=cfg.seed,
                       long_module_config=cfg.long_module_config)


def _optimizer(cfg: TrainConfig):
    if cfg.optimizer == "adagrad":
        return tf.keras.optimizers.Adagrad(cfg.learning_rate)
    return tf.keras.optimizers.Adam(cfg.learning_rate)


def create_variables(model, optimizer, element_spec) -> None:
    """Create the model's and the optimizer's variables before ``fit``'s first call.

    ``tf.function`` traces a function twice when its first call creates variables (once
    creating them, once more without), and Keras's train step creates the model's weights
    and Adam's slots on its first call: building them here makes ``fit`` trace its train
    step once (tiny DIN-L: 2 traces -> 1; about a quarter less CPU in a short model test,
    docs/benchmarks.md "Training start-up"). The model is called on a one-row batch of
    zeros (padding everywhere), so no data iterator is opened and the input order of the
    run is untouched. The seeded initial weights are drawn here, eagerly, instead of in
    the first trace: still one fixed draw per seed, but not the one versions before this
    function drew. Skipped for inputs whose non-batch dimensions are unknown (ragged
    specs), where ``fit`` builds as before."""
    specs = tf.nest.flatten(element_spec)
    if not all(isinstance(s, tf.TensorSpec) and s.shape.rank
               and s.shape[1:].is_fully_defined() for s in specs):
        return
    zeros = tf.nest.map_structure(lambda s: tf.zeros([1] + s.shape[1:].as_list(), s.dtype),
                                  element_spec)
    model(zeros, training=False)
    optimizer.build(model.trainable_variables)


def dataset(cfg: TrainConfig, split: str, training: bool) -> tf.data.Dataset:
    return D.make_dataset(S.split_pattern(cfg.data, split), cfg.short_len, cfg.long_len,
                          cfg.batch_size, shuffle=training, seed=cfg.seed,
                          shuffle_buffer=cfg.shuffle_buffer, cross_domain=cfg.cross_domain,
                          pipeline=cfg.input_pipeline)


class _EpochCheckpoint(tf.keras.callbacks.Callback):
    """Saves model + optimizer + the finished epoch count after every epoch."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch_var: tf.Variable):
        super().__init__()
        self.manager, self.epoch_var = manager, epoch_var

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_var.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


class _BestEpoch(tf.keras.callbacks.Callback):
    """Early stopping on validation AUC whose state survives ``--resume``.

    Hand-written instead of ``tf.keras.callbacks.EarlyStopping(restore_best_weights=True)``
    because that callback keeps the best weights, best AUC and patience counter only in
    the Python object: after ``--resume`` a fresh one has seen only the epochs after the
    interruption, so ``final/`` got the best of those (not of the run) and patience
    restarted. tf_keras ``BackupAndRestore`` does not help either: it saves model,
    optimizer and epoch (what ``ckpt/`` already has), not this state, and deletes its
    backup when ``fit`` ends, which would stop a finished run being resumed to more epochs.

    Here the best AUC, best epoch and patience counter are variables of the run's epoch
    checkpoint (``ckpt/``; this callback runs before :class:`_EpochCheckpoint` saves), and
    the best epoch's weights are written to ``ckpt/best/epoch-<N>`` when that epoch ends;
    the checkpoint of an epoch names the file it belongs to, so an interruption between
    the two writes leaves a consistent state. Files of superseded best epochs are removed
    once a later checkpoint no longer names them.

    Otherwise it follows EarlyStopping(monitor="val_auc", mode="max", min_delta=0):
    an epoch improves if its AUC is strictly greater than the best so far (the first
    epoch's weights are kept even if its AUC is NaN); training stops once ``patience``
    epochs in a row did not improve. Epoch numbers here are 1-based (epochs completed),
    like the checkpoint numbers.
    """

    def __init__(self, best_dir: str, patience: int):
        super().__init__()
        self.best_dir, self.patience = best_dir, patience
        self.state = tf.Module(name="best_epoch")
        self.state.auc = tf.Variable(-np.inf, dtype=tf.float64, trainable=False)
        self.state.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)   # 0 = none yet
        self.state.wait = tf.Variable(0, dtype=tf.int64, trainable=False)

    @property
    def best_epoch(self) -> int:
        return int(self.state.epoch.numpy())

    @property
    def best_auc(self) -> float:
        return float(self.state.auc.numpy())

    @property
    def wait(self) -> int:
        return int(self.state.wait.numpy())

    @property
    def exhausted(self) -> bool:
        """True when the restored state says the run already stopped early."""
        return bool(self.patience) and self.wait >= self.patience

    def path(self, epoch: int) -> str:
        return os.path.join(self.best_dir, f"epoch-{epoch}")

    def sweep(self) -> None:
        """Remove weight files of epochs the saved state no longer names as best."""
        keep = self.path(self.best_epoch) + "."
        for f in tf.io.gfile.glob(os.path.join(self.best_dir, "epoch-*")):
            if not f.startswith(keep):
                tf.io.gfile.remove(f)

    def on_epoch_begin(self, epoch, logs=None):
        self.sweep()   # the previous epoch's checkpoint is saved by now

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get("val_auc")
        if current is None:
            print("[train] early stopping: no val_auc in the epoch logs; skipped",
                  file=sys.stderr)
            return
        number = epoch + 1
        self.state.wait.assign_add(1)
        improved = float(current) > self.best_auc
        if improved or self.best_epoch == 0:
            tf.train.Checkpoint(model=self.model).write(self.path(number))
            self.state.epoch.assign(number)
        if improved:
            self.state.auc.assign(float(current))
            self.state.wait.assign(0)
        elif self.wait >= self.patience:
            self.model.stop_training = True
            print(f"[train] early stopping after epoch {number}: val AUC did not improve "
                  f"for {self.wait} epochs (best {self.best_auc:.4f} at epoch "
                  f"{self.best_epoch})", file=sys.stderr)

    def restore_best(self, model: tf.keras.Model) -> None:
        """Load the best epoch's weights into ``model`` (whose variables must exist)."""
        tf.train.Checkpoint(model=model).read(
            self.path(self.best_epoch)).assert_existing_objects_matched()


class _Throughput(tf.keras.callbacks.Callback):
    """Training examples/s per epoch (excluding validation)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size, self.rates = batch_size, []

    def on_epoch_begin(self, epoch, logs=None):
        self._t, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._t_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.last_rate = None
        if self._steps:
            self.last_rate = self._steps * self.batch_size / (self._t_end - self._t)
            self.rates.append(self.last_rate)


class _EpochLog(tf.keras.callbacks.Callback):
    """One JSON line per finished epoch in ``epochs.jsonl``: the 1-based epoch, its Keras
    logs, its wall time (training + validation) and training examples/s (from
    :class:`_Throughput`, which must run before this callback).

    Why a file: Keras' ``History`` and our own timers live in the process, so after
    ``--resume`` run.json described only the epochs of the last call (a resumed run that
    had finished reported a wall time of ~0 s and no speed, and its learning curve lost
    the epochs before the interruption). The line is written before the epoch's
    checkpoint is saved; on resume, lines past the checkpoint's epoch (an interruption
    between the two writes) are dropped by :func:`read_epoch_log` ``(upto=...)``."""

    def __init__(self, path: str, throughput: "_Throughput"):
        super().__init__()
        self.path, self.throughput = path, throughput

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rate = self.throughput.last_rate
        line = {"epoch": epoch + 1,
                "logs": {k: float(v) for k, v in (logs or {}).items()},
                "wall_s": time.perf_counter() - self._t,
                "train_examples_per_s": rate}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_epoch_log(path: str, upto: Optional[int] = None) -> List[Dict]:
    """The lines of an ``epochs.jsonl`` in epoch order, one per epoch (a later line of
    the same epoch, from a call that retrained it, wins), without epochs past ``upto``.
    Missing file: ``[]``."""
    if not os.path.exists(path):
        return []
    by_epoch: Dict[int, Dict] = {}
    with open(path) as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:   # a line cut short by a kill mid-write
                continue
            by_epoch[int(line["epoch"])] = line
    return [by_epoch[e] for e in sorted(by_epoch) if upto is None or e <= upto]


def _write_epoch_log(path: str, lines: List[Dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def history_from_epoch_log(lines: List[Dict]) -> Dict[str, List[float]]:
    """Keras-``History``-shaped ``{metric: [one value per epoch]}`` over the logged epochs
    (metrics every line has)."""
    keys = [k for k in (lines[0]["logs"] if lines else {})
            if all(k in line["logs"] for line in lines)]
    return {k: [float(line["logs"][k]) for line in lines] for k in keys}


def train(cfg: TrainConfig, resume: bool = False, distribute: str = "none",
          shard_policy: str = "file") -> Dict:
    """Fit a model; returns the run summary (also written to ``run.json``).

    ``distribute`` (none | mirrored | multi_worker) and ``shard_policy`` (file | data):
    :mod:`tfmodels.distribute`, docs/distributed.md; ``cfg.batch_size`` is the global
    batch. Under multi_worker only the chief writes ``cfg.out_dir``; the other workers
    write the same files to a temporary directory, removed at the end."""
    dist = DIST.setup(distribute)   # first: MultiWorkerMirroredStrategy before any TF op
    cfg.validate()
    DIST.check_config(dist, cfg.batch_size, cfg.steps_per_epoch, cfg.out_dir)
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("runs", f"{cfg.model}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir = dist.write_dir(cfg.out_dir)   # cfg.out_dir but on a non-chief worker
    os.makedirs(out_dir, exist_ok=True)
    tf.keras.utils.set_random_seed(cfg.seed)
    fschema = feature_schema_for(cfg)
    _write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))

    set_din_path(traced_din_path(cfg))   # read when the train/eval functions are traced
    with dist.scope():
        model = model_from_config(cfg, fschema)
        optimizer = DIST.mean_aggregating(_optimizer(cfg), dist)
        model.compile(optimizer=optimizer, jit_compile=resolve_jit_compile(cfg.jit_compile))
    DIST.configure_model(model, dist)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    best = _BestEpoch(os.path.join(out_dir, "ckpt", "best"), cfg.early_stopping_patience)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                               best=best.state)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "ckpt"), max_to_keep=2)
    initial_epoch = 0
    # every worker resumes from the chief's checkpoints (= manager's on the chief)
    latest = tf.train.latest_checkpoint(os.path.join(cfg.out_dir, "ckpt"))
    if resume and latest:
        ckpt.restore(latest)   # deferred: applied when variables are built
        initial_epoch = int(epoch_var.numpy())
        print(f"[train] resumed from {latest} at epoch {initial_epoch}", file=sys.stderr)
    elif resume:
        print("[train] --resume given but no checkpoint found; starting fresh", file=sys.stderr)

    train_ds = dataset(cfg, "train", training=True)
    valid_ds = dataset(cfg, "valid", training=False) if tf.io.gfile.glob(
        S.split_pattern(cfg.data, "valid")) else None
    if not dist.distributed:
        create_variables(model, optimizer, train_ds.element_spec)
    if cfg.steps_per_epoch:
        train_ds = train_ds.repeat()
    train_ds, valid_ds = DIST.shard_datasets(
        dist, train_ds, valid_ds, len(D.list_files(S.split_pattern(cfg.data, "train"))),
        shard_policy)
    # Keep the epochs the restored checkpoint covers; drop later lines (an interruption
    # between an epoch's log line and its checkpoint) and, on a fresh start, all.
    epoch_log = os.path.join(out_dir, "epochs.jsonl")
    earlier = read_epoch_log(epoch_log, upto=initial_epoch) if initial_epoch else []
    _write_epoch_log(epoch_log, earlier)
    throughput = _Throughput(cfg.batch_size)
    callbacks = [throughput, _EpochLog(epoch_log, throughput),
                 _EpochCheckpoint(manager, epoch_var),
                 tf.keras.callbacks.TensorBoard(os.path.join(out_dir, "tb"),
                                                update_freq="epoch", profile_batch=0)]
    early_stopping = bool(cfg.early_stopping_patience and valid_ds is not None)
    if early_stopping:
        callbacks.insert(0, best)   # before _EpochCheckpoint: its save includes this epoch
        if best.exhausted:
            print(f"[train] the run stopped early at epoch {initial_epoch} (no val AUC gain "
                  f"for {best.wait} epochs); nothing left to train", file=sys.stderr)
    print(f"[train] model={cfg.model} data={cfg.data} S={cfg.short_len} L={cfg.long_len} "
          f"epochs={cfg.epochs} batch={cfg.batch_size} out={cfg.out_dir}", file=sys.stderr)
    if dist.distributed:
        print(f"[train] distribute={dist.name} shard_policy={shard_policy} "
              f"replicas={dist.num_replicas} task={dist.task_type}:{dist.task_index} "
              f"chief={dist.is_chief} (batch {cfg.batch_size} is the global batch)",
              file=sys.stderr)
    # A progress bar redrawn with \r is unreadable in a log file: one line per epoch there.
    verbose = 2 if (cfg.verbose == 1 and not sys.stdout.isatty()) else cfg.verbose
    t0 = time.perf_counter()
    history = {}
    if initial_epoch < cfg.epochs and not (early_stopping and best.exhausted):
        hist = model.fit(train_ds, validation_data=valid_ds, epochs=cfg.epochs,
                         initial_epoch=initial_epoch,
                         steps_per_epoch=cfg.steps_per_epoch or None,
                         callbacks=callbacks, verbose=verbose)
        history = {k: [float(x) for x in v] for k, v in hist.history.items()}
    wall = time.perf_counter() - t0
    if not model.built:
        # No epoch ran in this call (a resumed run that had finished): build the model so
        # the restore deferred above fills its variables before final/ is written.
        model(next(iter(valid_ds if valid_ds is not None else train_ds)), training=False)
    if early_stopping and best.best_epoch and dist.is_chief:
        best.restore_best(model)   # final/ = the best epoch of the whole run
        best.sweep()
    final = tf.train.Checkpoint(model=model)
    final.write(os.path.join(out_dir, "final", "weights"))   # every worker: see write_dir
    stopped_epoch = int(epoch_var.numpy())
    logged = read_epoch_log(epoch_log, upto=stopped_epoch)
    if logged:   # the whole run's epochs, across --resume
        history = history_from_epoch_log(logged)
    rates = [line["train_examples_per_s"] for line in logged
             if line.get("train_examples_per_s")] if logged else throughput.rates
    # this call's wall plus the epochs of earlier calls (their fit start-up not included)
    run_wall = wall + sum(line["wall_s"] for line in earlier)
    summary = {"config": dataclasses.asdict(cfg), "feature_schema": fschema.to_dict(),
               "seed": cfg.seed, "versions": package_versions(), "git_commit": git_commit(),
               "data_meta": {k: v for k, v in S.read_meta(cfg.data).items()
                             if k in ("source", "protocol", "seed", "stats")},
               "history": history,
               # 1-based epoch of each history entry (epochs of calls before this one are
               # missing when their run directory predates epochs.jsonl)
               "history_epochs": ([int(line["epoch"]) for line in logged] if logged else
                                  list(range(stopped_epoch - len(next(iter(
                                      history.values()), [])) + 1, stopped_epoch + 1))),
               "train_wall_s": run_wall, "train_wall_s_this_call": wall,
               "resumed_at_epoch": initial_epoch,
               # 1-based epoch numbers over the whole run (across --resume): the last
               # epoch trained, and the epoch whose weights final/ holds.
               "stopped_epoch": stopped_epoch,
               "early_stopped": bool(early_stopping and best.exhausted),
               "best_epoch": best.best_epoch if early_stopping and best.best_epoch else None,
               "best_val_auc": (best.best_auc if early_stopping and np.isfinite(best.best_auc)
                                else None),
               "final_epoch": (best.best_epoch if early_stopping and best.best_epoch
                               else stopped_epoch),
               "train_examples_per_s": rates,
               "distribute": dict(dist.describe(), shard_policy=shard_policy,
                                  global_batch=cfg.batch_size),
               "train_examples_per_s_per_worker": [r / dist.num_workers for r in rates],
               "jit_compile_resolved": resolve_jit_compile(cfg.jit_compile),
               "num_params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}
    _write_json(os.path.join(out_dir, "run.json"), summary)
    dist.cleanup(cfg.out_dir)   # a non-chief worker's temporary directory
    return summary


def load_run(run_dir: str, data: Optional[str] = None):
    """Rebuild a trained model from a run directory (config + final weights)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{run_dir!r} is not a run directory (no config.json)")
    with open(path) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    if data:
        cfg.data = data
    set_din_path(traced_din_path(cfg))
    with open(os.path.join(run_dir, "run.json")) as f:
        fschema = S.FeatureSchema.from_dict(json.load(f)["feature_schema"])
    model = model_from_config(cfg, fschema)
    tf.train.Checkpoint(model=model).read(
        os.path.join(run_dir, "final", "weights")).expect_partial()
    return cfg, model


def predict(model: LifelongCTRModel, ds: tf.data.Dataset, group_key: str = "user_id",
            progress_every: int = 0) -> Dict[str, np.ndarray]:
    """Labels, CTRs and group keys over a dataset (progress lines to stderr)."""
    @tf.function(reduce_retracing=True)
    def step(batch):
        return tf.sigmoid(model(batch, training=False))

    labels, probs, groups = [], [], []
    t0 = time.perf_counter()
    for i, batch in enumerate(ds):
        if group_key not in batch:
            raise ConfigError(f"group key {group_key!r} is not a feature; "
                              f"available: {sorted(batch)}")
        probs.append(step(batch).numpy())
        labels.append(batch[S.LABEL].numpy())
        groups.append(batch[group_key].numpy())
        if progress_every and (i + 1) % progress_every == 0:
            n = sum(len(x) for x in labels)
            print(f"[evaluate] progress: {n:,} examples scored so far, "
                  f"{n / (time.perf_counter() - t0):,.0f}/s", file=sys.stderr)
    if not labels:
        raise ConfigError("the evaluation split is empty")
    if progress_every:
        print(f"[evaluate] done: {sum(len(x) for x in labels):,} examples scored",
              file=sys.stderr)
    return {"labels": np.concatenate(labels), "probs": np.concatenate(probs),
            "groups": np.concatenate(groups)}


def evaluate(run_dir: str, split: str = "test", data: Optional[str] = None,
             group_key: Optional[str] = None, batch_size: Optional[int] = None) -> Dict:
    """AUC, GAUC and logloss of a trained run on a split; writes ``metrics-<split>.json``."""
    cfg, model = load_run(run_dir, data)
    if batch_size:
        cfg.batch_size = batch_size
    if split not in S.SPLITS:
        raise ConfigError(f"split must be one of {S.SPLITS}, got {split!r}")
    ds = dataset(cfg, split, training=False)
    out = predict(model, ds, group_key or cfg.group_key, progress_every=50)
    result = M.all_metrics(out["labels"], out["probs"], out["groups"])
    result.update({"model": cfg.model, "split": split, "seed": cfg.seed, "data": cfg.data,
                   "group_key": group_key or cfg.group_key, "git_commit": git_commit()})
    _write_json(os.path.join(run_dir, f"metrics-{split}.json"), result)
    return result
