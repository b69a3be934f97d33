"""Per-user cache store: the ``user_tower`` outputs of each user, keyed by (model, user id).

One small interface, :class:`CacheStore`, with two backends:

* :class:`SQLiteCacheStore` (standard library; the embedded default): one table,
  primary key (model, user_id), WAL journal, one connection per thread;
* :class:`RedisCacheStore`: key ``<prefix><model>:<user_id>``; speaks RESP over a
  socket itself (no extra dependency) or uses any redis-py compatible client
  passed in (pooling, TLS, cluster).

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

import dataclasses
import json
import os
import socket
import sqlite3
import struct
import threading
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import numpy as np

MAGIC = b"LLC1"
_HEADER = struct.Struct("<I")

#: what the Beam loader hands to :meth:`CacheStore.put_many`:
#: (model_name, user_id, model_version, {name: array})
EntryTuple = Tuple[str, int, int, Mapping[str, np.ndarray]]


class CacheFormatError(ValueError):
    """A stored value is not a cache entry of this format."""


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
    """Interface: get / put / put_many / delete / count / close."""

    def get(self, model_name: str, user_id: int) -> Optional[CacheEntry]:
        raw = self.get_raw(model_name, int(user_id))
        return None if raw is None else CacheEntry.from_bytes(raw)

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
class RespError(RuntimeError):
    """An error reply from Redis."""


class MiniRedis:
    """A minimal RESP2 client (one connection per thread): the commands this store uses."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 password: Optional[str] = None, timeout_s: float = 5.0):
        self.host, self.port, self.db, self.password = host, port, db, password
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _socket(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = (sock, sock.makefile("rb"))
            self._local.conn = conn
            if self.password:
                self._roundtrip([("AUTH", self.password)])
            if self.db:
                self._roundtrip([("SELECT", str(self.db))])
        return conn

    @staticmethod
    def _encode(args: Sequence) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode("utf-8")
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _read(self, f):
        line = f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise ConnectionError(f"bad RESP reply {line[:40]!r}")

    def _roundtrip(self, commands):
        sock, f = self._socket()
        try:
            sock.sendall(b"".join(self._encode(c) for c in commands))
            replies = [self._read(f) for _ in commands]
        except (OSError, ConnectionError):
            self.close_thread()
            raise
        for r in replies:
            if isinstance(r, RespError):
                raise r
        return replies

    def execute(self, *args):
        return self._roundtrip([args])[0]

    def pipeline_execute(self, commands):
        return self._roundtrip(commands)

    def close_thread(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn[1].close()
                conn[0].close()
            finally:
                self._local.conn = None


class RedisCacheStore(CacheStore):
    """Redis backend. ``client``: a redis-py compatible object, else a built-in RESP client."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "lifelong:cache:",
                 client=None):
        self.url, self.prefix = url, prefix
        self._client = client
        if client is None:
            u = urlparse(url)
            if u.scheme != "redis":
                raise ValueError(f"redis store URL must be redis://host:port/db, got {url!r}")
            db = int(u.path.strip("/") or 0)
            self._mini = MiniRedis(u.hostname or "127.0.0.1", u.port or 6379, db, u.password)
        else:
            self._mini = None

    def _key(self, model_name: str, user_id: int) -> bytes:
        return f"{self.prefix}{model_name}:{int(user_id)}".encode("utf-8")

    def put_many(self, entries):
        cmds = []
        for item in entries:
            e = _as_entry(item)
            cmds.append(("SET", self._key(e.model_name, e.user_id), e.to_bytes()))
        for i in range(0, len(cmds), 500):
            chunk = cmds[i:i + 500]
            if self._mini is not None:
                self._mini.pipeline_execute(chunk)
            else:
                pipe = self._client.pipeline()
                for _, k, v in chunk:
                    pipe.set(k, v)
                pipe.execute()
        return len(cmds)

    def get_raw(self, model_name, user_id):
        key = self._key(model_name, user_id)
        raw = self._mini.execute("GET", key) if self._mini is not None else self._client.get(key)
        return None if raw is None else bytes(raw)

    def delete(self, model_name, user_id):
        key = self._key(model_name, user_id)
        n = self._mini.execute("DEL", key) if self._mini is not None else self._client.delete(key)
        return int(n) > 0

    def _scan(self, pattern: bytes) -> Iterator[bytes]:
        if self._mini is None:
            yield from self._client.scan_iter(match=pattern, count=1000)
            return
        cursor = b"0"
        while True:
            cursor, keys = self._mini.execute("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            yield from keys
            if cursor in (b"0", 0):
                return

    def count(self, model_name=None):
        suffix = "*" if model_name is None else f"{model_name}:*"
        return sum(1 for _ in self._scan(f"{self.prefix}{suffix}".encode("utf-8")))

    def close(self):
        if self._mini is not None:
            self._mini.close_thread()


def open_store(spec: str) -> CacheStore:
    """``sqlite:PATH``, a path (SQLite), or ``redis://host:port/db``."""
    if spec.startswith("redis://"):
        return RedisCacheStore(spec)
    if spec.startswith("sqlite:"):
        return SQLiteCacheStore(spec[len("sqlite:"):])
    if "://" in spec:
        raise ValueError(f"unknown cache store {spec!r}; use sqlite:PATH or redis://host:port/db")
    return SQLiteCacheStore(spec)
