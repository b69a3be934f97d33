"""Thin ranking client: cache lookup + one ``rank`` PredictRequest per user.

No TensorFlow on the import path: the request messages come from
:mod:`serving.protos` (a private descriptor pool) and tensors are built from
NumPy bytes (``tensor_content``). The same client talks to the local server
(``lifelong serve``) and to a real TensorFlow Serving::

    from serving.cache_store import open_store
    from serving.client import RankingClient

    client = RankingClient("127.0.0.1:8500", "din_l", open_store("sqlite:cache.db"))
    ctr = client.rank(user_id=42, candidates={"target_item_id": items,
                                              "target_cate_id": cates})   # float32 [N]

``rank``:

1. reads the user's :class:`~serving.cache_store.CacheEntry` (cache tensors and
   the short window, batch 1) from the store;
2. asks the server once per (model, version) which inputs ``rank`` takes
   (``GetModelMetadata``), to add ``user_id`` [1] / ``imp_ts`` [1] when the model
   reads them (``imp_ts`` defaults to now);
3. sends ``Predict`` with ``model_spec.version`` pinned to the version the cache
   was computed with (a cache belongs to its model's weights; the server keeps
   the latest two versions, see ``models.config``), under a deadline;
4. returns ``ctr`` [N].

A user without a cache entry raises :class:`NoCacheEntryError` unless a
``fallback`` was given: a callable ``user_id -> raw per-user features`` (the
``serving_default`` inputs besides the candidates, e.g. from a feature store);
the client then sends the one-shot ``serving_default`` request instead. Never a
silent default score. gRPC failures raise ``grpc.RpcError`` (``.code()``,
``.details()``).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from serving import protos
from serving.cache_store import CacheEntry, CacheStore

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
TARGETS = ("target_item_id", "target_cate_id")
USER_SCALARS = ("user_id", "imp_ts")
MiB = 1 << 20

Candidates = Union[Mapping[str, Sequence[int]], Tuple[Sequence[int], Sequence[int]], np.ndarray]
Fallback = Callable[[int], Optional[Mapping[str, np.ndarray]]]


class NoCacheEntryError(LookupError):
    """The store has no cache entry for this user and model (and no fallback was given)."""


def candidate_arrays(candidates: Candidates) -> Tuple[np.ndarray, np.ndarray]:
    """``{"target_item_id", "target_cate_id"}``, ``(items, cates)`` or an [N, 2] array
    -> two int64 [N] arrays."""
    if isinstance(candidates, Mapping):
        missing = [k for k in TARGETS if k not in candidates]
        if missing:
            raise ValueError(f"candidates lack {missing}")
        items, cates = candidates["target_item_id"], candidates["target_cate_id"]
    elif isinstance(candidates, tuple) and len(candidates) == 2:
        items, cates = candidates
    else:
        arr = np.asarray(candidates)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError("candidates must be a mapping, an (items, cates) pair or an "
                             f"[N, 2] array; got shape {arr.shape}")
        items, cates = arr[:, 0], arr[:, 1]
    items = np.ascontiguousarray(items, dtype=np.int64).reshape(-1)
    cates = np.ascontiguousarray(cates, dtype=np.int64).reshape(-1)
    if items.shape != cates.shape:
        raise ValueError(f"{items.shape[0]} candidate items but {cates.shape[0]} categories")
    return items, cates


class RankingClient:
    """Ranking client for one served model.

    Args:
      target: ``host:port`` of the gRPC server (local server or TF Serving).
      model_name: served model name (``saved_models/<model_name>``).
      store: cache store (:func:`serving.cache_store.open_store`); needed by ``rank``.
      timeout_s: per-request deadline.
      fallback: ``user_id -> raw per-user features`` used when the cache has no
        entry (the one-shot ``serving_default`` request); ``None``: raise.
      pin_version: send the cache entry's ``model_version`` (default; unpinned
        requests go to the latest version, whose weights may not match the cache).
      metrics: counts each cache-store lookup of :meth:`rank` as a hit or a miss
        (:class:`serving.metrics.ClientMetrics`, or any object with
        ``cache_lookup(model, hit)``); ``None``: not counted.
    """

    def __init__(self, target: str = "127.0.0.1:8500", model_name: str = "",
                 store: Optional[CacheStore] = None, timeout_s: float = 2.0,
                 fallback: Optional[Fallback] = None, pin_version: bool = True,
                 max_message_bytes: int = 256 * MiB, channel: Optional[grpc.Channel] = None,
                 metrics=None):
        self.target, self.model_name, self.store = target, model_name, store
        self.metrics = metrics
        self.timeout_s, self.fallback, self.pin_version = timeout_s, fallback, pin_version
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self.m = protos.messages()
        self._predict = self.channel.unary_unary(
            PREDICT, request_serializer=self.m.PredictRequest.SerializeToString,
            response_deserializer=self.m.PredictResponse.FromString)
        self._meta_fn = None
        self._inputs_cache: Dict[Tuple[str, Optional[int], str], Optional[frozenset]] = {}
        self._lock = threading.Lock()

    # ---- metadata --------------------------------------------------------------------------
    def signature_inputs(self, signature: str, version: Optional[int] = None,
                         model_name: Optional[str] = None) -> Optional[frozenset]:
        """Input names of a signature (cached); ``None`` if the server does not say."""
        model_name = model_name or self.model_name
        key = (model_name, version, signature)
        with self._lock:
            if key in self._inputs_cache:
                return self._inputs_cache[key]
        mm = protos.messages(metadata=True)
        if self._meta_fn is None:
            self._meta_fn = self.channel.unary_unary(
                GET_METADATA, request_serializer=mm.GetModelMetadataRequest.SerializeToString,
                response_deserializer=mm.GetModelMetadataResponse.FromString)
        req = mm.GetModelMetadataRequest()
        req.model_spec.name = model_name
        if version is not None:
            req.model_spec.version.value = int(version)
        req.metadata_field.append("signature_def")
        resp = self._meta_fn(req, timeout=self.timeout_s)
        sig_map = mm.SignatureDefMap.FromString(resp.metadata["signature_def"].value)
        names = (frozenset(sig_map.signature_def[signature].inputs)
                 if signature in sig_map.signature_def else None)
        with self._lock:
            self._inputs_cache[key] = names
        return names

    # ---- requests ----------------------------------------------------------------------------
    def _request(self, signature: str, version: Optional[int], model_name: Optional[str] = None):
        req = self.m.PredictRequest()
        req.model_spec.name = model_name or self.model_name
        req.model_spec.signature_name = signature
        if version is not None:
            req.model_spec.version.value = int(version)
        return req

    def rank_request(self, entry: CacheEntry, candidates: Candidates,
                     short: Optional[Mapping[str, np.ndarray]] = None,
                     imp_ts: Optional[int] = None):
        """The ``rank`` PredictRequest for one cached user and N candidates."""
        items, cates = candidate_arrays(candidates)
        version = entry.model_version if self.pin_version else None
        req = self._request("rank", version)
        tensors = dict(entry.tensors)
        tensors.pop("user_id", None)
        for name, value in (short or {}).items():   # a fresher short window from the caller
            if name not in tensors:
                raise ValueError(f"short feature {name!r} is not one the model's rank reads "
                                 f"({sorted(k for k in tensors if k.startswith('short_'))})")
            tensors[name] = np.asarray(value, tensors[name].dtype).reshape(tensors[name].shape)
        for name, value in tensors.items():
            protos.fill_tensor_proto(req.inputs[name], value)
        protos.fill_tensor_proto(req.inputs["target_item_id"], items)
        protos.fill_tensor_proto(req.inputs["target_cate_id"], cates)
        wanted = self.signature_inputs("rank", version) or frozenset()
        if "user_id" in wanted:
            protos.fill_tensor_proto(req.inputs["user_id"], np.array([entry.user_id], np.int64))
        if "imp_ts" in wanted:
            ts = int(time.time()) if imp_ts is None else int(imp_ts)
            protos.fill_tensor_proto(req.inputs["imp_ts"], np.array([ts], np.int64))
        return req

    def one_shot_request(self, user_id: int, user_features: Mapping[str, np.ndarray],
                         candidates: Candidates, imp_ts: Optional[int] = None,
                         version: Optional[int] = None):
        """``serving_default`` request: the user's raw features tiled to N rows + candidates.

        ``user_features``: the per-user inputs of ``serving_default`` (short/long
        windows as [S] / [L] or [1, S] / [1, L]); ``user_id`` and ``imp_ts`` are
        filled from the arguments when the signature reads them.
        """
        items, cates = candidate_arrays(candidates)
        n = items.shape[0]
        req = self._request("serving_default", version)
        wanted = self.signature_inputs("serving_default", version)
        feats = dict(user_features)
        feats.setdefault("user_id", np.array([user_id], np.int64))
        if imp_ts is not None:                        # the request time wins
            feats["imp_ts"] = np.array([int(imp_ts)], np.int64)
        feats.setdefault("imp_ts", np.array([int(time.time())], np.int64))
        names = (wanted - set(TARGETS)) if wanted is not None else set(feats) - set(USER_SCALARS)
        missing = sorted(names - set(feats))
        if missing:
            raise ValueError(f"one-shot request needs user features {missing}")
        for name in sorted(names):
            arr = np.asarray(feats[name])
            if name in USER_SCALARS:
                arr = arr.reshape(-1)[:1]             # one value per user -> [1]
            elif arr.ndim == 1:
                arr = arr[None]                       # [S] -> [1, S]
            if arr.shape[0] != 1:
                raise ValueError(f"user feature {name!r} must hold one user (shape "
                                 f"[1, ...] or [...]), got {arr.shape}")
            protos.fill_tensor_proto(req.inputs[name], np.broadcast_to(arr, (n,) + arr.shape[1:]))
        protos.fill_tensor_proto(req.inputs["target_item_id"], items)
        protos.fill_tensor_proto(req.inputs["target_cate_id"], cates)
        return req

    def predict(self, request, timeout_s: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Send a PredictRequest; outputs as NumPy arrays."""
        resp = self._predict(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        return {k: protos.to_ndarray(v) for k, v in resp.outputs.items()}

    def _ctr(self, request, n: int, timeout_s: Optional[float]) -> np.ndarray:
        ctr = self.predict(request, timeout_s)["ctr"]
        if ctr.shape != (n,):
            raise RuntimeError(f"server returned ctr of shape {ctr.shape} for {n} candidates")
        return ctr

    # ---- the API -----------------------------------------------------------------------------
    def rank(self, user_id: int, candidates: Candidates,
             short: Optional[Mapping[str, np.ndarray]] = None, imp_ts: Optional[int] = None,
             timeout_s: Optional[float] = None) -> np.ndarray:
        """CTRs float32 [N] of N candidates for one user (see the module doc)."""
        if self.store is None:
            raise ValueError("RankingClient.rank needs a cache store (store=...)")
        entry = self.store.get(self.model_name, int(user_id))
        if self.metrics is not None:
            self.metrics.cache_lookup(self.model_name, entry is not None)
        n = candidate_arrays(candidates)[0].shape[0]
        if entry is None:
            feats = self.fallback(int(user_id)) if self.fallback is not None else None
            if feats is None:
                raise NoCacheEntryError(
                    f"no cache entry for user {int(user_id)} of model '{self.model_name}' "
                    "(run `lifelong precompute` for this model, or pass fallback= to score "
                    "with the one-shot serving_default signature)")
            return self.one_shot(int(user_id), feats, candidates, imp_ts, timeout_s)
        return self._ctr(self.rank_request(entry, candidates, short, imp_ts), n, timeout_s)

    def one_shot(self, user_id: int, user_features: Mapping[str, np.ndarray],
                 candidates: Candidates, imp_ts: Optional[int] = None,
                 timeout_s: Optional[float] = None, version: Optional[int] = None) -> np.ndarray:
        """CTRs through ``serving_default`` (no cache): the user's features tiled N times."""
        req = self.one_shot_request(user_id, user_features, candidates, imp_ts, version)
        return self._ctr(req, candidate_arrays(candidates)[0].shape[0], timeout_s)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
