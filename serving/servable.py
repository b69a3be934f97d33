"""A servable: one loaded model version the server can run.

* :class:`Servable` -- the interface the model manager and the gRPC services use
  (``name``, ``version``, ``signatures``, :meth:`Servable.run`);
* :class:`SavedModelServable` -- one SavedModel version (``serving/export.py``
  layout), run through a session callable per SignatureDef, like TF Serving;
* :class:`SessionThreads` -- the session's thread settings (``--inter_op`` /
  ``--intra_op``);
* :class:`SignatureInfo` / :class:`TensorSpecInfo` -- a signature's inputs and outputs
  as the request checks (:mod:`serving.validation`) read them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

import tfmodels  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import get_model_metadata_pb2

from serving import protos

log = logging.getLogger("serving.server")


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    dtype: int                          # TF DataType enum
    shape: Optional[Tuple[Optional[int], ...]]   # None = unknown rank; None dims = any size


@dataclasses.dataclass
class SignatureInfo:
    inputs: Dict[str, TensorSpecInfo]
    outputs: Dict[str, TensorSpecInfo]
    any_inputs: bool = False            # accepts whatever it is sent (no input checks)

    @functools.cached_property
    def plan(self) -> Tuple[tuple, ...]:
        """What :func:`serving.validation.decode_inputs` checks per input, read once:
        ``(name, dtype enum, NumPy dtype or None (strings, undecodable), shape, is the
        first dim the batch)`` sorted by name. Built on first use, so ``inputs`` must not
        change after that (no code here changes it)."""
        out = []
        for name in sorted(self.inputs):
            spec = self.inputs[name]
            np_dtype = protos.DTYPE_TO_NUMPY.get(spec.dtype)
            if np_dtype is not None and np_dtype.kind == "O":
                np_dtype = None
            out.append((name, spec.dtype, np_dtype, spec.shape,
                        bool(spec.shape) and spec.shape[0] is None))
        return tuple(out)


class Servable:
    """What the server runs: ``signatures`` (name -> :class:`SignatureInfo`) and
    :meth:`run` (decoded NumPy inputs -> NumPy outputs of one signature)."""

    name: str
    version: int
    signatures: Dict[str, SignatureInfo]

    def run(self, signature: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def signature_def_map(self):
        return get_model_metadata_pb2.SignatureDefMap()


def spec_from_tensor_info(info) -> TensorSpecInfo:
    if info.tensor_shape.unknown_rank:
        return TensorSpecInfo(int(info.dtype), None)
    return TensorSpecInfo(int(info.dtype), tuple(None if d.size < 0 else int(d.size)
                                                 for d in info.tensor_shape.dim))


@dataclasses.dataclass(frozen=True)
class SessionThreads:
    """The session's thread settings, named after TF Serving's flags of the same meaning
    (``--tensorflow_inter_op_parallelism``, ``--tensorflow_intra_op_parallelism``).

    ``inter_op = -1`` runs every op in the request's own thread instead of handing
    ops to a shared pool, which saves a thread hand-off per call (expensive on these
    VMs): measured in-process with a 3 ms pause before each call, an identity
    SavedModel call takes 0.11-0.14 ms instead of 0.22-0.24 ms, an XLA ``rank`` call
    at N = 1 0.68-0.80 ms instead of 0.79-0.82 ms (docs/serving.md section 6). The
    gRPC worker threads still run requests in parallel, and ``intra_op`` (0 = one
    per core) still splits large ops. Use ``--inter_op 0`` for the TensorFlow
    default; ``--intra_op 1`` suits a server that only ranks (one-shot requests over
    long sequences then run on one core).
    """
    inter_op: int = -1
    intra_op: int = 0

    def config(self):
        return tf.compat.v1.ConfigProto(inter_op_parallelism_threads=self.inter_op,
                                        intra_op_parallelism_threads=self.intra_op)


class SavedModelServable(Servable):
    """One loaded SavedModel version, run like TF Serving runs it: a session over the
    MetaGraph tagged ``serve``, one session callable per SignatureDef.

    The callable is the session's ``CallableOptions`` one (``TF_SessionRunCallable``:
    feeds and fetches fixed once, NumPy arrays in, NumPy arrays out), not the public
    ``make_callable(fetches, feed_list)``, which with a feed list falls back to
    ``Session.run`` and re-validates every feed in Python on each call (graph-element
    lookups, shape checks, NumPy version checks): measured here, that Python work was
    about a third of an XLA ``rank`` call at N = 100 (docs/serving.md section 6).
    ``_make_callable_from_options`` is private but is what Keras 2's graph functions
    call; where it is missing, the public ``make_callable`` is used. The server has
    checked names, dtypes and shapes before :meth:`run` (``decode_inputs``); ``run``
    still casts each input to its declared dtype, so other callers may pass lists.

    (Measured earlier, a session callable was 25-35% faster per request than calling
    the TF2 ``tf.saved_model.load(...).signatures[...]`` wrapper for small requests.)
    """

    def __init__(self, name: str, version: int, path: str,
                 threads: Optional[SessionThreads] = None):
        self.name, self.version, self.path = name, int(version), path
        self._graph = tf.Graph()
        self._sess = tf.compat.v1.Session(graph=self._graph,
                                          config=(threads or SessionThreads()).config())
        meta = tf.compat.v1.saved_model.loader.load(self._sess, ["serve"], path)
        self._sig_defs = dict(meta.signature_def)
        self._callables = {}
        self.signatures = {}
        for k, d in self._sig_defs.items():
            ins, outs = sorted(d.inputs), sorted(d.outputs)
            feeds = [d.inputs[i].name for i in ins]
            fetches = [d.outputs[o].name for o in outs]
            fast = getattr(self._sess, "_make_callable_from_options", None)
            if fast is not None and all(":" in t for t in feeds + fetches):  # tensors,
                # not ops (``__saved_model_init_op`` names an op)
                options = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
                call = fast(options)
            else:
                call = self._sess.make_callable(fetches, feeds)
            dtypes = [tf.dtypes.as_dtype(d.inputs[i].dtype).as_numpy_dtype for i in ins]
            self._callables[k] = (ins, outs, call, dtypes)
            self.signatures[k] = SignatureInfo(
                {n: spec_from_tensor_info(i) for n, i in d.inputs.items()},
                {n: spec_from_tensor_info(i) for n, i in d.outputs.items()})

    def run(self, signature, inputs):
        ins, outs, call, dtypes = self._callables[signature]
        return dict(zip(outs, call(*[np.asarray(inputs[k], dt)
                                     for k, dt in zip(ins, dtypes)])))

    def close(self) -> None:
        self._sess.close()

    def warmup(self) -> None:
        """Replay the version's TF Serving warmup records
        (``assets.extra/tf_serving_warmup_requests``, :mod:`serving.warmup`) when it has
        them: a record that fails fails the load, as in TF Serving. Without them, run
        every non-string signature once on zeros (padding ids) of batch 1."""
        from serving import warmup as W    # lazily: the export side imports servable-free
        requests = W.read_warmup_requests(self.path)
        if requests is not None:
            self.warmup_records = W.replay(self, requests)
            return
        for sig, info in self.signatures.items():
            if any(s.dtype == 7 or s.shape is None for s in info.inputs.values()):
                continue
            feed = {n: np.zeros([1 if d is None else d for d in s.shape],
                                protos.DTYPE_TO_NUMPY[s.dtype])
                    for n, s in info.inputs.items()}
            try:
                self.run(sig, feed)
            except Exception as e:  # a model may reject all-padding input; still serve it
                log.warning("warm-up of %s/%d %s failed: %s", self.name, self.version, sig,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)

    def signature_def_map(self):
        m = get_model_metadata_pb2.SignatureDefMap()
        for k, d in self._sig_defs.items():
            m.signature_def[k].CopyFrom(d)
        return m
