"""Per-user cache store: the ``user_tower`` outputs of each user, keyed by (model, user id).

One small interface, :class:`CacheStore`, with two backends:

* :class:`SQLiteCacheStore` (standard library; the embedded default): one table,
  primary key (model, user_id), WAL journal, one connection per thread;
* :class:`RedisCacheStore`: key ``<prefix><model>:<user_id>``, through redis-py
  (the ``redis`` extra: ``pip install 'lifelong-ctr[redis]'``), with a client it
  makes from the URL or any redis-py client passed in (pooling, TLS, cluster).
  Without redis-py it raises :class:`RedisNotInstalledError`; an unreachable
  server raises :class:`RedisUnavailableError` (a ``ConnectionError``).

A value is one :class:`CacheEntry`: model name, model version, user id and the
tensors the client sends to ``rank`` (each cache tensor and the short window,
each with its leading batch dimension of 1). It is encoded with NumPy only
(no TensorFlow on the client's path)::

    b"LLC1" | uint32 header length | JSON header | raw little-endian tensor bytes

The header lists ``[name, dtype, shape, offset, nbytes]`` per tensor. The store
keeps the latest entry per (model, user); the entry's ``model_version`` tells the
client which exported version the cache belongs to (it pins its request to it).

``open_store("sqlite:PATH" | "PATH.db" | "redis://host:port/db")`` picks a backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import struct
import threading
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import numpy as np

# The package's user-error base: the CLI prints a LifelongError as one line, exit 2.
# Importing it runs tfmodels/__init__ (sets TF_USE_LEGACY_KERAS) but loads no
# TensorFlow, so the client's import path stays TF-free (tests/test_serving.py).
from tfmodels.errors import LifelongError

MAGIC = b"LLC1"
_HEADER = struct.Struct("<I")

#: what the Beam loader hands to :meth:`CacheStore.put_many`:
#: (model_name, user_id, model_version, {name: array})
EntryTuple = Tuple[str, int, int, Mapping[str, np.ndarray]]


class CacheFormatError(ValueError):
    """A stored value is not a cache entry of this format."""


class StoreSpecError(ValueError, LifelongError):
    """A store spec or URL that names no usable store (``--store``)."""


@dataclasses.dataclass
class CacheEntry:
    model_name: str
    model_version: int
    user_id: int
    tensors: Dict[str, np.ndarray]

    def to_bytes(self) -> bytes:
        meta, chunks, offset = [], [], 0
        for name, value in self.tensors.items():
            arr = np.asarray(value)
            if arr.dtype.kind in "SUO":
                raise CacheFormatError(f"tensor {name!r} has non-numeric dtype {arr.dtype}")
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            raw = arr.tobytes()
            meta.append([name, arr.dtype.str, list(arr.shape), offset, len(raw)])
            chunks.append(raw)
            offset += len(raw)
        header = json.dumps({"model_name": self.model_name,
                             "model_version": int(self.model_version),
                             "user_id": int(self.user_id), "tensors": meta},
                            separators=(",", ":")).encode("utf-8")
        return b"".join([MAGIC, _HEADER.pack(len(header)), header, *chunks])

    @classmethod
    def from_bytes(cls, data: bytes) -> "CacheEntry":
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEADER.size:
            raise CacheFormatError("value is not a lifelong cache entry (bad magic)")
        (hlen,) = _HEADER.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _HEADER.size
        try:
            header = json.loads(data[start:start + hlen])
        except ValueError as e:
            raise CacheFormatError(f"cache entry header is not JSON: {e}") from None
        body = memoryview(data)[start + hlen:]
        tensors = {}
        for name, dtype, shape, offset, nbytes in header["tensors"]:
            arr = np.frombuffer(body[offset:offset + nbytes], dtype=np.dtype(dtype))
            tensors[name] = arr.reshape(shape)
        return cls(header["model_name"], int(header["model_version"]),
                   int(header["user_id"]), tensors)

    @property
    def nbytes(self) -> int:
        """Size of the encoded value (what the store holds per user)."""
        return len(self.to_bytes())


def _as_entry(item: Union[CacheEntry, EntryTuple]) -> CacheEntry:
    if isinstance(item, CacheEntry):
        return item
    model_name, user_id, version, tensors = item
    return CacheEntry(str(model_name), int(version), int(user_id),
                      {k: np.asarray(v) for k, v in tensors.items()})


class CacheStore:
    """Interface: get / get_many / put / put_many / delete / count / close."""

    def get(self, model_name: str, user_id: int) -> Optional[CacheEntry]:
        raw = self.get_raw(model_name, int(user_id))
        return None if raw is None else CacheEntry.from_bytes(raw)

    def get_many(self, model_name: str, user_ids: Iterable[int]) -> List[Optional[CacheEntry]]:
        """One entry (or None) per user id, in order (Redis: MGET, one round trip per 500)."""
        raws = self.get_many_raw(model_name, [int(u) for u in user_ids])
        return [None if raw is None else CacheEntry.from_bytes(raw) for raw in raws]

    def get_many_raw(self, model_name: str, user_ids: Sequence[int]) -> List[Optional[bytes]]:
        return [self.get_raw(model_name, int(u)) for u in user_ids]

    def put(self, entry: Union[CacheEntry, EntryTuple]) -> None:
        self.put_many([entry])

    def put_many(self, entries: Iterable[Union[CacheEntry, EntryTuple]]) -> int:
        raise NotImplementedError

    def get_raw(self, model_name: str, user_id: int) -> Optional[bytes]:
        raise NotImplementedError

    def delete(self, model_name: str, user_id: int) -> bool:
        raise NotImplementedError

    def count(self, model_name: Optional[str] = None) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- SQLite ------------------------------------------------------------------------------
class SQLiteCacheStore(CacheStore):
    """SQLite file (or ``:memory:`` for one thread). Safe to share across threads."""

    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self._local = threading.local()
        self._conns = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.execute("CREATE TABLE IF NOT EXISTS user_cache (model TEXT NOT NULL, "
                         "user_id INTEGER NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL, "
                         "PRIMARY KEY (model, user_id)) WITHOUT ROWID")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def put_many(self, entries):
        rows = []
        for item in entries:
            e = _as_entry(item)
            rows.append((e.model_name, int(e.user_id), int(e.model_version), e.to_bytes()))
        conn = self._conn()
        with conn:
            conn.executemany("INSERT OR REPLACE INTO user_cache VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def get_raw(self, model_name, user_id):
        row = self._conn().execute("SELECT value FROM user_cache WHERE model = ? AND user_id = ?",
                                   (model_name, int(user_id))).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, model_name, user_id):
        conn = self._conn()
        with conn:
            cur = conn.execute("DELETE FROM user_cache WHERE model = ? AND user_id = ?",
                               (model_name, int(user_id)))
        return cur.rowcount > 0

    def count(self, model_name=None):
        if model_name is None:
            return self._conn().execute("SELECT COUNT(*) FROM user_cache").fetchone()[0]
        return self._conn().execute("SELECT COUNT(*) FROM user_cache WHERE model = ?",
                                    (model_name,)).fetchone()[0]

    def close(self):
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()


# ---- Redis -------------------------------------------------------------------------------
class RedisNotInstalledError(ImportError, LifelongError):
    """The Redis backend was asked for but redis-py is not installed."""


class RedisUnavailableError(ConnectionError, LifelongError):
    """The Redis server could not be reached (refused, timed out, dropped, bad AUTH).

    A builtin ``ConnectionError`` (an ``OSError``), as socket errors were when the
    store spoke RESP itself; the message names the server and how to start one."""


def _import_redis():
    try:
        import redis
    except ImportError as e:
        raise RedisNotInstalledError(
            "the Redis cache store needs redis-py: pip install 'lifelong-ctr[redis]' "
            "(or pip install 'redis>=5'); the SQLite store (sqlite:PATH) needs nothing") from e
    return redis


def _redact(url: str) -> str:
    """``url`` without its password (error messages, repr)."""
    u = urlparse(url)
    if u.password is None:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
    return u._replace(netloc=netloc).geturl()


class RedisCacheStore(CacheStore):
    """Redis backend through redis-py (``pip install 'lifelong-ctr[redis]'``).

    Key ``<prefix><model>:<user_id>``, value the encoded :class:`CacheEntry` (its
    ``model_version`` travels in the value, so a new version overwrites the key).
    ``client``: any redis-py client (``redis.Redis`` with your own pool or TLS,
    ``redis.RedisCluster``); else one is made from ``url`` (``redis://[:password@]
    host:port/db``) with ``timeout_s`` for connect and each reply. redis-py's client is
    thread-safe (a connection pool), so one store is shared by threads. The server is
    pinged on construction: an unreachable server fails here, before a long
    precompute, with :class:`RedisUnavailableError`.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "lifelong:cache:",
                 client=None, timeout_s: float = 5.0):
        self.url, self.prefix = url, prefix
        self._where = _redact(url) if client is None else repr(client)
        self._owns_client = client is None
        if client is None:
            u = urlparse(url)
            try:
                ok = u.scheme == "redis" and int(u.path.strip("/") or 0) >= 0 \
                    and (u.port is None or u.port > 0)      # .port: ValueError if bad
            except ValueError:
                ok = False
            if not ok:
                raise StoreSpecError(
                    f"redis store URL must be redis://host:port/db, got {self._where!r}")
            redis = _import_redis()
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                          socket_timeout=timeout_s)
            self._unavailable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        else:
            try:
                redis = _import_redis()
                self._unavailable = (redis.exceptions.ConnectionError,
                                     redis.exceptions.TimeoutError)
            except RedisNotInstalledError:   # a compatible client that does not need redis-py
                self._unavailable = ()
        self._client = client
        with self._errors():
            self._client.ping()

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except self._unavailable as e:
            raise RedisUnavailableError(
                f"redis cache store {self._where} is unreachable: {e} "
                "(is redis-server running there? e.g. `redis-server --port 6379`; "
                "or use the embedded store, sqlite:PATH)") from e

    def _key(self, model_name: str, user_id: int) -> bytes:
        return f"{self.prefix}{model_name}:{int(user_id)}".encode("utf-8")

    def put_many(self, entries):
        n, chunk = 0, []

        def flush():
            # transaction=False: a plain pipeline (one round trip per 500 SETs), no
            # MULTI/EXEC; also what redis.RedisCluster accepts.
            pipe = self._client.pipeline(transaction=False)
            for k, v in chunk:
                pipe.set(k, v)
            with self._errors():
                pipe.execute()

        for item in entries:
            e = _as_entry(item)
            chunk.append((self._key(e.model_name, e.user_id), e.to_bytes()))
            n += 1
            if len(chunk) >= 500:
                flush()
                chunk = []
        if chunk:
            flush()
        return n

    def get_raw(self, model_name, user_id):
        with self._errors():
            raw = self._client.get(self._key(model_name, user_id))
        return None if raw is None else bytes(raw)

    def get_many_raw(self, model_name, user_ids):
        keys = [self._key(model_name, u) for u in user_ids]
        out = []
        for i in range(0, len(keys), 500):
            with self._errors():
                out.extend(self._client.mget(keys[i:i + 500]))
        return [None if raw is None else bytes(raw) for raw in out]

    def delete(self, model_name, user_id):
        with self._errors():
            n = self._client.delete(self._key(model_name, user_id))
        return int(n) > 0

    def count(self, model_name=None):
        suffix = "*" if model_name is None else f"{model_name}:*"
        with self._errors():
            return sum(1 for _ in self._client.scan_iter(
                match=f"{self.prefix}{suffix}".encode("utf-8"), count=1000))

    def close(self):
        # Only a client the store made is closed (its pool's sockets); a passed-in
        # client belongs to the caller. A later call reconnects, as before.
        if self._owns_client:
            self._client.close()
            self._client.connection_pool.disconnect()


def open_store(spec: str) -> CacheStore:
    """``sqlite:PATH``, a path (SQLite), or ``redis://host:port/db``."""
    if spec.startswith("redis://"):
        return RedisCacheStore(spec)
    if spec.startswith("sqlite:"):
        return SQLiteCacheStore(spec[len("sqlite:"):])
    if "://" in spec:
        raise StoreSpecError(
            f"unknown cache store {spec!r}; use sqlite:PATH or redis://host:port/db")
    return SQLiteCacheStore(spec)
