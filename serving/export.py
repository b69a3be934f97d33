"""SavedModel export with split signatures, in TensorFlow Serving's folder layout.

Contract: ``../shared/DESIGN.md`` "SavedModel signatures"; the split is
METHODS 1.5 (user tower offline, ranking online); full input/output tables in
``docs/serving.md``. For a model ``m`` (a :class:`LifelongCTRModel`) with short
window length S:

* ``user_tower``: ``records`` string [B] (serialized per-user records, as the
  Beam prepare job writes them) -> ``user_id`` int64 [B], the short window the
  tower saw (only the ``short_*`` features that ``m.feature_names("rank")``
  lists, [B, S]) and every tensor of ``m.user_tower`` under its cache key
  (batch first). The windows end at the last stored behavior
  (:func:`tfmodels.data.user_history_features`). A model trained on COMPACT records
  (``meta.json`` ``format`` = ``per_user_record_compact_v1``) is exported with its
  dataset's item table baked in (``item_table=``, :func:`tfmodels.schema.load_item_table` of the run's data folder): its
  ``user_tower`` then takes compact records (decoded in-graph by the training
  pipeline's own decoder) and full ones, one format per request.
* ``rank``: ONE user's cache tensors (batch 1, same names as the user_tower
  outputs) + the short features [1, S] + candidates ``target_item_id``,
  ``target_cate_id`` [N] (+ ``user_id`` [1] / ``imp_ts`` [1] when the model
  reads them) -> ``ctr`` float32 [N].
* ``serving_default``: every feature of ``m.feature_names("all")``, batch B ->
  ``ctr`` float32 [B] (no cache; one-shot).

Every id input is range-checked inside the graph (``tf.debugging`` asserts naming
the input) and every float ``rank`` input is checked finite, so a bad request
gets INVALID_ARGUMENT with a clear message from the local server and from a real
TensorFlow Serving alike.

A version is written to ``<base>/<model>/.tmp-export-*`` and renamed to
``<base>/<model>/<version>/`` (atomic on one file system; TF Serving and the
local server ignore non-numeric folders), then ``<base>/models.config`` is
rewritten. Names or versions that would leave ``<base>`` are rejected.

Deviation from a plain ``tf.saved_model.save(model, ...)``: the saved object is a
small ``tf.Module`` holding the model's variables and the three signature
functions, not the Keras model itself. Saving the Keras object makes Keras trace
every layer's call (measured here: 16-23 s per tiny model and 0.7-1.4 MB, against
2.2-2.6 s and 0.26-0.53 MB; loading 3-4.5 s against 0.7-0.8 s), and the result
cannot be reopened with ``tf.keras.models.load_model`` anyway (DESIGN). The
signatures are identical either way. ``keras_object=True`` saves the model object.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import time
import uuid
from typing import Dict, List, Mapping, Optional, Sequence

import tfmodels  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S
from tfmodels.errors import LifelongError
from serving import flags
from serving.paths import inside

SIGNATURES = ("user_tower", "rank", "serving_default")
RECORDS = "records"
CTR = "ctr"
CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_params.pbtxt"   # TF Serving's per-model batching parameters
EXPORT_META = os.path.join("assets.extra", "lifelong_export.json")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TMP_PREFIX = ".tmp-export-"
USER_SCALARS = ("user_id", "imp_ts")   # per-user [1] inputs of `rank` when the model reads them


class ExportError(ValueError, LifelongError):
    """Bad export arguments (name, version, path) or a model the contract cannot express."""


# ---- names and paths -----------------------------------------------------------------------
def validate_model_name(name) -> str:
    """A model name is one path component: letters, digits, ``_ . -``; no leading dot."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' "
                          "(one folder name; no '/', no leading '.', no '..')")
    return name


def validate_version(version) -> int:
    """A version is a positive integer (TF Serving's numbered version folders)."""
    if isinstance(version, bool):
        raise ExportError(f"invalid version {version!r}: must be a positive integer")
    if isinstance(version, str):
        if not re.fullmatch(r"[0-9]{1,18}", version):
            raise ExportError(f"invalid version {version!r}: must be a positive integer")
        version = int(version)
    if not isinstance(version, int) or not 1 <= version < 2 ** 63:
        raise ExportError(f"invalid version {version!r}: must be a positive integer")
    return version


def model_dir(base: str, name: str) -> str:
    path = os.path.join(base, validate_model_name(name))
    if not inside(base, path):
        raise ExportError(f"model folder {path!r} resolves outside the base path {base!r}")
    return path


def version_dir(base: str, name: str, version) -> str:
    path = os.path.join(model_dir(base, name), str(validate_version(version)))
    if not inside(base, path):
        raise ExportError(f"version folder {path!r} resolves outside the base path {base!r}")
    return path


def list_versions(path: str) -> List[int]:
    """Numeric version folders of one model folder, ascending."""
    if not os.path.isdir(path):
        return []
    return sorted(int(v) for v in os.listdir(path)
                  if re.fullmatch(r"[0-9]{1,18}", v) and os.path.isdir(os.path.join(path, v)))


# ---- signatures ----------------------------------------------------------------------------
def _id_vocab(fs: S.FeatureSchema, name: str) -> Optional[int]:
    v = fs.vocab
    if name == "user_id":
        return v.num_users
    if name.endswith("item_id"):
        return v.num_items
    if name.endswith("cate_id"):
        return v.num_categories
    if name.endswith("_domain"):
        return v.num_domains
    if name.endswith("gap_bucket"):
        return S.NUM_GAP_BUCKETS
    return None


def _input_checks(values: Mapping[str, tf.Tensor], fs: S.FeatureSchema, where: str,
                  finite: Sequence[str] = ()) -> List[tuple]:
    """``(name, vocab, message)`` for every input to check: id inputs against their
    vocabulary ``[0, vocab)``, ``finite`` float inputs (``vocab`` None) for NaN/Inf."""
    out = []
    for name, x in values.items():
        vocab = _id_vocab(fs, name) if x.dtype.is_integer else None
        if vocab is not None:
            out.append((name, vocab, f"{where}: input '{name}' holds ids outside "
                                     f"[0, {vocab}) (its vocabulary)"))
        elif name in finite and x.dtype.is_floating:
            out.append((name, None, f"{where}: input '{name}' holds NaN or Inf"))
    return out


def _input_ok(x: tf.Tensor, vocab: Optional[int]) -> tf.Tensor:
    """Scalar bool: every id of ``x`` in ``[0, vocab)``, or (``vocab`` None) every value
    finite. reduce_min/max of an empty tensor are +-max: a 0-row batch passes."""
    if vocab is None:
        return tf.reduce_all(tf.math.is_finite(x))
    return tf.logical_and(tf.reduce_min(x) >= 0, tf.reduce_max(x) < tf.constant(vocab, x.dtype))


def _checked(values: Mapping[str, tf.Tensor], fs: S.FeatureSchema, where: str,
             finite: Sequence[str] = ()) -> Dict[str, tf.Tensor]:
    """Range-check id inputs ([0, vocab)) and finiteness of ``finite`` float inputs.

    Returns the inputs behind control dependencies, so a bad id fails with a
    message naming the input before any embedding lookup runs. The checks are
    plain ``Assert`` ops with string data (``tf.debugging.assert_less`` would wrap
    each in a ``cond`` function, about 0.1 ms per input per call) and
    ``CheckNumerics``. (The XLA ``rank`` computes the same checks inside its
    cluster instead: :meth:`ServingSignatures._rank`.)
    """
    out = dict(values)
    for name, vocab, message in _input_checks(values, fs, where, finite):
        x = values[name]
        if vocab is not None:
            check = tf.debugging.Assert(_input_ok(x, vocab), [message])
            with tf.control_dependencies([check]):
                out[name] = tf.identity(x)
        else:
            out[name] = tf.debugging.check_numerics(x, message)
    return out


def _trace(fn, input_signature):
    """Trace ``fn`` once: without AutoGraph first, with it only if the code needs it.

    AutoGraph's source transformation is about 40% of an export's time here, and it
    changes nothing for code whose Python control flow depends on Python values
    only. Code with tensor-dependent Python control flow raises when traced without
    AutoGraph and is then traced again with it, so the graph is what ``tf.function``
    would give either way.
    """
    try:
        return tf.function(fn, input_signature=input_signature,
                           autograph=False).get_concrete_function()
    except Exception:  # noqa: BLE001 -- any failure: trace the AutoGraph way
        return tf.function(fn, input_signature=input_signature).get_concrete_function()


def _small_weights(model, max_elements: int) -> List[tuple]:
    """``(module, attribute, variable, value)`` for every weight of ``model`` with at
    most ``max_elements`` elements that a layer holds as a plain attribute (how
    Keras layers keep ``kernel``, ``bias``, ``embeddings``...). Weights kept in
    lists or dicts are not found and simply stay variables."""
    weights = {id(w) for w in model.weights}
    out = []
    for module in [model, *model.submodules]:
        for attr, v in list(vars(module).items()):
            if (isinstance(v, tf.Variable) and id(v) in weights
                    and v.shape.num_elements() is not None
                    and v.shape.num_elements() <= max_elements):
                out.append((module, attr, v, v.numpy()))
    return out


@contextlib.contextmanager
def _weights_as_constants(small: Sequence[tuple]):
    """While tracing: each listed layer attribute reads a graph constant holding the
    weight's value instead of the variable; restored afterwards whatever happens.

    Written here rather than with TensorFlow's ``convert_variables_to_constants_v2``:
    that converts every variable (the embedding tables too, which can exceed
    GraphDef's 2 GB limit and make XLA compile them into the binary) and lives in a
    private module. ``object.__setattr__`` bypasses Keras' attribute tracking, so the
    layers' weight lists, the checkpoint and the other signatures are untouched.
    """
    done = []
    try:
        for module, attr, v, value in small:
            object.__setattr__(module, attr, tf.constant(value, v.dtype))
            done.append((module, attr, v))
        yield
    finally:
        for module, attr, v in done:
            object.__setattr__(module, attr, v)


def _pow2_bucket(n: tf.Tensor, minimum: int) -> tf.Tensor:
    """The next power of two >= max(n, minimum) (int32 scalar ``n``; ``minimum`` >= 1):
    the padded size an XLA signature compiles for. 2^(floor(log2 m) + 1) with
    m = max(n, minimum) - 1, floor(log2 m) read from the float32 exponent bits (exact
    for m < 2^24; above, rounding can only round up, so the bucket is never smaller
    than n). Few nodes: it runs in front of the XLA cluster on every call."""
    # m = 0 has no exponent: with minimum 1, n <= 1 takes m = 1 and is set to 1 after
    m = tf.maximum(n, minimum) - 1 if minimum > 1 else tf.maximum(n - 1, 1)
    m = tf.cast(m, tf.float32)
    bucket = tf.bitwise.left_shift(1, tf.bitwise.right_shift(tf.bitcast(m, tf.int32), 23)
                                   - 126)
    return bucket if minimum > 1 else tf.where(n <= 1, 1, bucket)


#: the fewest rows a ``--jit_rank`` export's ``rank`` runs (N < 8 is padded to 8)
MIN_RANK_BUCKET = 8
#: ``rank_buckets`` ladders (``lifelong export --rank_buckets``); the first is the default
RANK_BUCKETS = flags.RANK_BUCKETS


def _check_ladder(ladder: str) -> str:
    """``ladder`` if it is one of :data:`RANK_BUCKETS`, else :class:`ExportError`."""
    if ladder not in RANK_BUCKETS:
        raise ExportError(f"unknown rank_buckets {ladder!r}; one of {list(RANK_BUCKETS)}")
    return ladder


def rank_bucket(n: tf.Tensor, ladder: str = RANK_BUCKETS[0]) -> tf.Tensor:
    """The padded candidate count a ``--jit_rank`` export's ``rank`` runs for N = ``n``
    (int32 scalar tensor): XLA compiles once per value, and the padded rows are
    computed and cut off. The ONE rule: the export's graph calls it, and
    :func:`serving.warmup.bucket_sizes` evaluates it to send one warmup request per
    value.

    * ``"fine"`` (the default): multiples of 8 up to 64 (8, 16, ..., 64), then four
      steps per octave, multiples of 2^(e-2) for 2^e < N <= 2^(e+1) (80, 96, 112, 128,
      160, 192, 224, 256, 320, ...): a bucket is at most 1.25x N above 64, so N = 100
      runs as 112 rows, not 128. Compilations up to N_max: 8 + 4 log2(N_max / 64),
      37 up to N = 10,000 (the server's ``--max_candidates`` default), 51 up to 10^5
      (``"pow2"``: 12 and 15). Why this one (docs/benchmarks.md, issue 20 item 6,
      "Session 6: finer XLA candidate buckets"): the padded rows cost as much as real
      ones (the top-k methods sort per row; TWIN's in-process ``rank`` at L = 1,000:
      7.70 / 7.79 / 8.14 / 9.56 ms for 100 / 104 / 112 / 128 rows), while every bucket is one more
      XLA compilation at load (2-6 s each on the 2-core machine, replayed by the warmup
      records); 8 steps per octave (104 rows) would save another 3-6% for twice the
      compilations.
    * ``"pow2"``: the next power of two >= max(N, 8) (8, 16, 32, ..., 12 buckets up to
      10,000; up to 2x N): the ladder before, kept for before/after measurements.

    Few nodes either way: it runs in front of the XLA cluster on every call.
    Elementwise, so ``n`` may also be a vector of counts (the tests pass 1..10,000).
    """
    if _check_ladder(ladder) == "pow2":
        return _pow2_bucket(n, MIN_RANK_BUCKET)
    m = tf.maximum(n, MIN_RANK_BUCKET)
    # e = floor(log2(m - 1)) from the float32 exponent bits (exact for m < 2^24; above,
    # rounding can only make e, so the bucket, larger), step = max(8, 2^(e - 2))
    e = tf.bitwise.right_shift(tf.bitcast(tf.cast(m - 1, tf.float32), tf.int32), 23) - 127
    step = tf.bitwise.left_shift(1, tf.maximum(e - 2, 3))
    return (m + step - 1) // step * step


def _zeros(spec: tf.TensorSpec, batch: int) -> tf.Tensor:
    shape = [batch if d is None else d for d in spec.shape.as_list()]
    return tf.zeros(shape, spec.dtype)


class ServingSignatures:
    """The three signature functions of one model (traced once, reused for saving).

    Attributes after construction: ``cache_keys`` (user_tower cache outputs, in
    order), ``short_names``, ``user_scalars`` and ``functions`` (name ->
    ConcreteFunction).

    ``jit_rank``: compile the ``rank`` computation, input checks included, with XLA
    (``jit_compile``). Measured here at N = 100 candidates it takes the in-process
    ``rank`` call from about 1.9 ms to 1.3 ms (docs/serving.md section 6): the ranking
    graph is hundreds of tiny ops whose per-op cost dominates, and XLA fuses them.
    Candidates are padded to buckets (``rank_buckets``: the ladder of
    :func:`rank_bucket`, default ``"fine"``) so that XLA compiles per bucket, not per
    distinct N (the first request of a new bucket pays the compilation, tens to
    hundreds of ms; the warmup records pay them at load). A real TensorFlow Serving
    then needs ``--xla_cpu_compilation_enabled=true`` (``serving/tf_serving.sh`` passes it); off
    by default for that reason.

    With ``jit_rank`` the model's small weights (every variable of at most
    ``max_const_elements`` elements: the MLPs, PReLU slopes, small vocabularies
    such as categories) are also baked into the XLA computation as constants, read
    once at export (:func:`_small_weights`); the embedding tables above the limit
    stay variables shared with the other signatures. XLA then folds the weight
    arithmetic at compile time (e.g. DIN's split first layer) and the cluster
    takes 6 arguments instead of 23 (avg_pool): measured on this VM, with a 3 ms
    pause before each call as between real requests, about 0.15 ms less per
    ``rank`` call at N = 1 and N = 100 (docs/serving.md section 6). The SavedModel
    grows by the size of those weights (a few KB to MB).

    ``jit_user_tower``: compile the model's part of ``user_tower`` (embedding
    lookups and the long module's ``user_cache``; the record parsing stays outside)
    with XLA. The batch is padded with empty users (id 0, mask 0) to the next power
    of two, so XLA compiles per bucket (1, 2, 4, ..., the precompute's
    ``--batch_size``), not per batch size; the padded rows are cut off. Measured on
    C-Former at L = 1,000 (docs/benchmarks.md, precompute): its ``user_cache`` is a
    handful of big elementwise passes over [B, L, h J] that XLA fuses. Off by
    default: a model whose ``user_cache`` has an op XLA cannot compile fails at its
    first call, and TensorFlow Serving needs ``--xla_cpu_compilation_enabled=true``.

    ``item_table`` (:class:`tfmodels.schema.ItemTable`, from :func:`tfmodels.schema.load_item_table`): the
    model's training data are compact records; ``user_tower`` then decodes compact
    records with it (see :meth:`_user_features`). None: full records only (a compact
    record fails with INVALID_ARGUMENT saying its item table is missing).
    """

    def __init__(self, model, jit_rank: bool = False, max_const_elements: int = 65_536,
                 item_table: Optional[S.ItemTable] = None, jit_user_tower: bool = False,
                 rank_buckets: str = RANK_BUCKETS[0]):
        self.model = model
        self.item_table = item_table
        self.jit_rank = bool(jit_rank)
        self.rank_buckets = _check_ladder(rank_buckets)
        self.jit_user_tower = bool(jit_user_tower)
        self.max_const_elements = int(max_const_elements)
        self.const_weights: List[str] = []
        self.fs: S.FeatureSchema = model.feature_schema
        self.specs = self.fs.feature_specs()
        rank_names = model.feature_names("rank")
        self.short_names = [n for n in rank_names if n.startswith("short_")]
        self.user_scalars = [n for n in rank_names if n in USER_SCALARS]
        other = set(rank_names) - set(self.short_names) - set(self.user_scalars) - {
            "target_item_id", "target_cate_id"}
        if other:
            raise ExportError(f"{model.model_name}: rank part reads {sorted(other)}, which the "
                              "rank signature contract does not carry")
        self._build_model()
        self.cache_keys: List[str] = []
        self.functions = {}
        self.functions["user_tower"] = _trace(self._user_tower, [
            tf.TensorSpec([None], tf.string, name=RECORDS)])
        cache_specs = self._cache_specs(self.functions["user_tower"].structured_outputs)
        rank_specs = dict(cache_specs)
        S_len = self.fs.short_len
        for n in self.short_names:
            rank_specs[n] = tf.TensorSpec([1, S_len], self.specs[n].dtype, n)
        for n in ("target_item_id", "target_cate_id"):
            rank_specs[n] = tf.TensorSpec([None], tf.int64, n)
        for n in self.user_scalars:
            rank_specs[n] = tf.TensorSpec([1], self.specs[n].dtype, n)
        self.rank_specs = rank_specs
        self.functions["rank"] = _trace(self._rank, [rank_specs])
        self.default_specs = {n: self.specs[n] for n in model.feature_names("all")}
        self.functions["serving_default"] = _trace(self._serving_default, [self.default_specs])

    # -- building ----------------------------------------------------------------------------
    def _build_model(self) -> None:
        """Create (and, for a restored run, restore) every variable eagerly."""
        feats = {n: _zeros(s, 2) for n, s in self.specs.items()}
        self.model(feats, training=False)
        self.model.rank(self.model.user_tower(feats, training=False), feats, training=False)

    def _cache_specs(self, outputs) -> Dict[str, tf.TensorSpec]:
        reserved = {"user_id", "imp_ts", CTR, RECORDS, "target_item_id", "target_cate_id",
                    *self.short_names, *S.TARGET_FIELDS}
        specs = {}
        for key in self.cache_keys:
            if key in reserved:
                raise ExportError(f"{self.model.model_name}: cache key {key!r} collides with a "
                                  "feature/output name of the serving contract; rename it")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ExportError(f"{self.model.model_name}: cache key {key!r} is not a valid "
                                  "signature name ([A-Za-z_][A-Za-z0-9_]*)")
            t = outputs[key]
            if t.shape.rank is None or t.shape.rank < 1:
                raise ExportError(f"{self.model.model_name}: cache tensor {key!r} has shape "
                                  f"{t.shape}; cache tensors must be batch first")
            specs[key] = tf.TensorSpec([1] + t.shape.as_list()[1:], t.dtype, key)
        return specs

    # -- signature functions -----------------------------------------------------------------
    def _user_features(self, records):
        """The user tower's windows of a batch of records.

        With an item table the table is a ``tf.constant`` inside the graph (two int64
        columns: 16 bytes per item in ``saved_model.pb``, 16 MB for a million items,
        far below protobuf's 2 GB; chosen over a SavedModel asset + ``tf.lookup``
        table because the training pipeline decodes with exactly this constant +
        ``tf.gather`` (:func:`tfmodels.schema.decode_compact_tensors`), so serving runs
        the same decoder, and a dense id -> row gather needs no hash table). Records
        carry their format (compact ones a ``record_format`` marker), so a batch of
        full records still works (the full branch of a ``tf.cond``: one extra parse of
        that one feature per request); a batch mixing both formats is refused.
        """
        if self.item_table is None:
            return D.user_history_features(records, self.fs)
        marker = tf.io.parse_example(records, {"record_format": tf.io.FixedLenFeature(
            [], tf.string, default_value=b"")})["record_format"]
        # compact v1 and v2 records alike (one decoder reads both, in one batch too)
        n_compact = tf.reduce_sum(tf.cast(D.is_compact_marker(marker), tf.int32))
        ok = tf.logical_or(tf.equal(n_compact, 0), tf.equal(n_compact, tf.size(marker)))
        check = tf.debugging.Assert(ok, [
            f"user_tower: one request mixes compact ({S.FORMAT_COMPACT}) and full "
            f"({S.FORMAT_FULL}) per-user records; send one format per request. "
            "compact records, batch size:", n_compact, tf.size(marker)])
        with tf.control_dependencies([check]):
            n_compact = tf.identity(n_compact)
        return tf.cond(
            n_compact > 0,
            lambda: D.user_history_features(records, self.fs, item_table=self.item_table),
            lambda: D.user_history_features(records, self.fs))

    def _user_tower(self, records):
        feats = self._user_features(records)
        read = set(self.model.feature_names("user_tower")) | set(self.short_names)
        feats = _checked({k: v for k, v in feats.items() if k in read or k == "user_id"},
                         self.fs, "user_tower")
        if self.jit_user_tower:
            cache = self._jit_user_tower({k: v for k, v in feats.items() if k != "user_id"})
        else:
            cache = self.model.user_tower(feats, training=False)
        self.cache_keys = list(cache)
        out = {"user_id": feats["user_id"]}
        out.update({n: feats[n] for n in self.short_names})
        out.update(cache)
        return out

    def _jit_user_tower(self, feats):
        """``model.user_tower`` under XLA on the batch padded to a power of two
        (see ``jit_user_tower`` in the class docstring); padded rows are all-zero
        features (id 0 = padding: users without behaviors), cut off after."""
        n = tf.shape(next(iter(feats.values())))[0]
        bucket = _pow2_bucket(n, 1)
        padded = {k: tf.pad(v, tf.concat([[[0, bucket - n]],
                                          tf.zeros([tf.rank(v) - 1, 2], tf.int32)], 0))
                  for k, v in feats.items()}
        jitted = tf.function(lambda f: self.model.user_tower(f, training=False),
                             jit_compile=True, autograph=False)
        return {k: v[:n] for k, v in jitted(padded).items()}

    def _rank(self, inputs):
        def score(inputs):
            cache = {k: inputs[k] for k in self.cache_keys}
            features = {k: v for k, v in inputs.items() if k not in cache}
            return tf.sigmoid(self.model.rank(cache, features, training=False))
        if not self.jit_rank:
            return {CTR: score(_checked(inputs, self.fs, "rank", finite=self.cache_keys))}
        return {CTR: self._jit_rank(inputs, score)}

    def _jit_rank(self, inputs, score):
        """``rank`` with XLA; the graph around the cluster is kept to a few nodes, since
        each node costs microseconds per call (docs/serving.md section 6).

        * XLA compiles once per input shape: the candidates are padded (id 0, the
          padding id) to :func:`rank_bucket` of ``self.rank_buckets`` (37 buckets up
          to N = 10,000 with ``"fine"``, 12 with ``"pow2"``) instead of one compilation
          per distinct N; the padded rows are scored independently and cut off.
        * The input checks are computed INSIDE the cluster (the index of the first
          failing input, from one reduction) and a single ``Assert`` outside it
          (XLA compiles Assert to a no-op) gates the output, with the same messages
          as :func:`_checked`. Out-of-range ids reach XLA's gathers first, which clamp
          them (no crash); the request still fails with INVALID_ARGUMENT naming
          the first bad input.
        * Small weights are constants (see the class docstring).
        """
        checks = _input_checks(inputs, self.fs, "rank", finite=self.cache_keys)
        n = tf.size(inputs["target_item_id"])
        bucket = rank_bucket(n, self.rank_buckets)
        paddings = tf.expand_dims(tf.stack([0, bucket - n]), 0)
        padded = dict(inputs)
        for k in ("target_item_id", "target_cate_id"):
            padded[k] = tf.pad(inputs[k], paddings)
        with tf.init_scope():                  # read the weights' values eagerly
            small = _small_weights(self.model, self.max_const_elements)
        self.const_weights = [v.name for _, _, v, _ in small]

        def checked_score(inputs):
            with _weights_as_constants(small):
                ctr = score(inputs)
            # One code per element: the index of its input where the element is bad,
            # len(checks) where fine; the minimum over ONE concatenation is the first
            # bad input. XLA:CPU emits two kernels for that reduction, where a
            # min/max/all per input took ~19 (each kernel launch costs microseconds).
            ok_code = len(checks)
            codes = [tf.constant([ok_code])]
            for i, (name, vocab, _) in enumerate(checks):
                x = tf.reshape(inputs[name], [-1])
                bad = (tf.logical_not(tf.math.is_finite(x)) if vocab is None else
                       tf.logical_or(x < 0, x >= tf.constant(vocab, x.dtype)))
                codes.append(tf.where(bad, i, ok_code))
            first_bad = tf.reduce_min(tf.concat(codes, 0))
            return ctr, tf.equal(first_bad, ok_code), first_bad
        jitted = tf.function(checked_score, jit_compile=True, autograph=False)
        ctr, ok, first_bad = jitted(padded)
        # the last message is read (never shown) when every input is fine
        messages = tf.constant([message for _, _, message in checks] + [""])
        check = tf.debugging.Assert(ok, [tf.gather(messages, first_bad)])
        with tf.control_dependencies([check]):
            return tf.identity(ctr[:n])

    def _serving_default(self, inputs):
        inputs = _checked(inputs, self.fs, "serving_default")
        return {CTR: tf.sigmoid(self.model(inputs, training=False))}

    # -- description -------------------------------------------------------------------------
    def describe(self) -> Dict[str, Dict[str, Dict[str, Dict]]]:
        """{signature: {"inputs"|"outputs": {name: {"dtype", "shape"}}}} (None = any size)."""
        out = {}
        for sig, fn in self.functions.items():
            ins = fn.structured_input_signature[1] or {}
            if not ins:  # one positional dict argument
                ins = fn.structured_input_signature[0][0]
                ins = ins if isinstance(ins, dict) else {RECORDS: ins}
            outs = fn.structured_outputs
            out[sig] = {
                "inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                           for k, v in sorted(ins.items())},
                "outputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                            for k, v in outs.items()}}
        return out


# ---- export --------------------------------------------------------------------------------
def _save(model, sigs: ServingSignatures, path: str, keras_object: bool) -> None:
    signatures = dict(sigs.functions)
    if keras_object:
        tf.saved_model.save(model, path, signatures=signatures)
        return
    module = tf.Module()
    module.model_variables = list(model.variables)
    tf.saved_model.save(module, path, signatures=signatures)


def _static_din_path(fn):
    """Trace a whole export under the DIN unit's "folded" layout: a training process may
    have chosen "valid" (:data:`tfmodels.layers.DIN_PATHS`), whose data-dependent row
    count XLA (``jit_rank``, ``jit_user_tower``) cannot compile."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from tfmodels.layers import din_path_scope
        with din_path_scope("folded"):
            return fn(*args, **kwargs)
    return wrapped


@_static_din_path
def export_model(model, base: str = "saved_models", name: Optional[str] = None,
                 version: Optional[int] = None, config_base: str = "/models",
                 num_versions: int = 2, keras_object: bool = False,
                 extra_meta: Optional[Mapping] = None,
                 batching_params: Optional[str] = None, jit_rank: bool = False,
                 warmup_max_candidates: Optional[int] = None,
                 item_table: Optional[S.ItemTable] = None,
                 jit_user_tower: bool = False, rank_buckets: str = RANK_BUCKETS[0]) -> Dict:
    """Export ``model`` to ``<base>/<name>/<version>/`` and refresh ``models.config``.

    ``version`` defaults to the next free number. ``batching_params``: a TF Serving
    ``BatchingParameters`` text file copied in as ``batching_params.pbtxt``, which
    makes TF Serving (``--enable_per_model_batching_parameters``) batch requests to
    this version. Only for a deployment that serves ``serving_default``: batching
    needs every input of a request to share its 0th dimension, which ``rank``
    (cache [1, ...], candidates [N]) does not. Returns ``{"path", "name",
    "version", "signatures", "wall_s"}``. ``jit_rank``, ``jit_user_tower``,
    ``rank_buckets``: see :class:`ServingSignatures`.
    ``warmup_max_candidates``: write TF Serving warmup records
    (``assets.extra/tf_serving_warmup_requests``, :mod:`serving.warmup`: one ``rank``
    request per candidate bucket of ``rank_buckets`` up to this N, one ``user_tower``, one
    ``serving_default``), which TF Serving and the local server replay before the
    version is AVAILABLE; ``None`` / 0 (the default here; ``lifelong export`` writes
    them for N up to 10,000 unless ``--warmup_max_candidates 0``): none.
    ``item_table``: the training data's item table (:func:`tfmodels.schema.load_item_table`; compact
    records), baked into ``user_tower``; None = full records only.
    """
    t0 = time.perf_counter()
    name = validate_model_name(name or model.model_name)
    os.makedirs(base, exist_ok=True)
    mdir = model_dir(base, name)
    os.makedirs(mdir, exist_ok=True)
    auto = version is None
    version = (max(list_versions(mdir), default=0) + 1) if auto else validate_version(version)
    final = version_dir(base, name, version)
    if os.path.exists(final):
        raise ExportError(f"{final} already exists; versions are immutable, export a new one")
    sigs = ServingSignatures(model, jit_rank=jit_rank, item_table=item_table,
                             jit_user_tower=jit_user_tower, rank_buckets=rank_buckets)
    tmp = os.path.join(mdir, f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    try:
        _save(model, sigs, tmp, keras_object)
        if batching_params:
            shutil.copyfile(batching_params, os.path.join(tmp, BATCHING_FILE))
        warmup_info = None
        if warmup_max_candidates:
            from serving import warmup as W
            requests = W.warmup_requests(sigs, name, warmup_max_candidates)
            W.write_warmup_file(tmp, requests)
            warmup_info = {"records": len(requests),
                           "rank_candidates": W.bucket_sizes(warmup_max_candidates,
                                                             sigs.rank_buckets)}
        meta = {"model_name": name, "version": version, "registry_model": model.model_name,
                "model_config": model.get_config(), "signatures": sigs.describe(),
                "cache_keys": sigs.cache_keys, "short_features": sigs.short_names,
                "user_scalars": sigs.user_scalars, "created_unix": time.time(),
                "keras_object": keras_object, "jit_rank": sigs.jit_rank,
                "rank_buckets": sigs.rank_buckets,
                "jit_user_tower": sigs.jit_user_tower,
                "rank_const_weights": sigs.const_weights, "warmup": warmup_info,
                "record_formats": ([S.FORMAT_FULL] if item_table is None
                                   else [S.FORMAT_COMPACT, S.FORMAT_FULL]),
                "item_table_rows": None if item_table is None else len(item_table),
                **dict(extra_meta or {})}
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, EXPORT_META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        while True:
            try:
                os.rename(tmp, final)   # atomic; fails if `final` appeared meanwhile
                break
            except OSError:
                if not auto or not os.path.exists(final):
                    raise ExportError(f"could not move the export into {final}") from None
                version += 1            # another exporter took this number: take the next
                final = version_dir(base, name, version)
                meta["version"] = version
                with open(os.path.join(tmp, EXPORT_META), "w") as f:
                    json.dump(meta, f, indent=2, sort_keys=True, default=str)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    write_models_config(base, config_base=config_base, num_versions=num_versions)
    return {"path": final, "name": name, "version": version, "signatures": sigs.describe(),
            "wall_s": time.perf_counter() - t0}


def read_export_meta(version_path: str) -> Dict:
    with open(os.path.join(version_path, EXPORT_META)) as f:
        return json.load(f)


def write_models_config(base: str, config_base: str = "/models", num_versions: int = 2) -> str:
    """(Re)write ``<base>/models.config`` listing every model folder with a version.

    ``base_path`` of each model is ``<config_base>/<name>`` (``/models`` is where
    ``serving/tf_serving.sh`` mounts ``saved_models/`` in the TF Serving container;
    pass an absolute host path to run a TF Serving binary directly).
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as msc

    config = msc.ModelServerConfig()
    for name in sorted(os.listdir(base)):
        if not NAME_RE.match(name) or not list_versions(os.path.join(base, name)):
            continue
        if not inside(base, os.path.join(base, name)):
            continue
        c = config.model_config_list.config.add()
        c.name = name
        c.base_path = config_base.rstrip("/") + "/" + name
        c.model_platform = "tensorflow"
        c.model_version_policy.latest.num_versions = int(num_versions)
    text = ("# Written by `lifelong export` (serving/export.py): TensorFlow Serving's model\n"
            "# config (text format of tensorflow.serving.ModelServerConfig). base_path is\n"
            f"# {config_base!r}/<model>, where serving/tf_serving.sh mounts saved_models/.\n"
            + text_format.MessageToString(config))
    path = os.path.join(base, CONFIG_FILE)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ---- CLI -----------------------------------------------------------------------------------
# The flags live in serving/flags.py (no TensorFlow there): `lifelong export --help` is fast.
add_arguments = flags.add_export_arguments


def run(args) -> Dict:
    if args.run:
        from tfmodels.train import load_run
        cfg, model = load_run(args.run)
        data_dir = cfg.data
    elif args.model and args.data:
        data_dir = args.data
        from tfmodels.model import build_model
        tf.keras.utils.set_random_seed(args.seed)
        fs = S.FeatureSchema.from_data_dir(args.data, args.short_len, args.long_len)
        model = build_model(fs, args.model, emb_dim=args.emb_dim)
    else:
        raise ExportError("give --run RUN_DIR, or --model NAME with --data DATA (untrained)")
    version = validate_version(args.version) if args.version is not None else None
    out = export_model(model, args.base, args.name, version, args.config_base, args.num_versions,
                       extra_meta={"run": args.run} if args.run else None,
                       batching_params=args.batching_params, jit_rank=args.jit_rank,
                       warmup_max_candidates=getattr(args, "warmup_max_candidates", 0),
                       item_table=S.load_item_table(data_dir),
                       jit_user_tower=getattr(args, "jit_user_tower", False),
                       rank_buckets=getattr(args, "rank_buckets", RANK_BUCKETS[0]))
    print(f"[export] {out['name']} version {out['version']} -> {out['path']} "
          f"({out['wall_s']:.1f}s)", file=sys.stderr)
    return out
