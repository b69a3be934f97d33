"""Cache stores (serving/cache_store.py): SQLite (embedded default) and Redis through redis-py.

The Redis tests run against a REAL ``redis-server`` started once per test session on
a free loopback port (``--save '' --appendonly no``: nothing written to disk) and
stopped after. Without ``redis-server`` (or redis-py) they SKIP locally but FAIL
when the environment variable ``CI`` is set: CI (``.ci/run``) installs
``redis-server`` and ``./test.sh`` installs redis-py (the ``test`` extra), so a
skip there would hide an untested backend.

Every behaviour test runs on both backends (``store`` is parametrized), so the
Redis store is checked to behave as the SQLite one does.
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from serving.cache_store import (CacheEntry, RedisCacheStore, RedisNotInstalledError,
                                 RedisUnavailableError, SQLiteCacheStore, StoreSpecError,
                                 open_store)
from tfmodels.errors import LifelongError

IN_CI = bool(os.environ.get("CI"))


def _skip_or_fail(msg: str):
    if IN_CI:
        pytest.fail(f"{msg}: CI (CI={os.environ['CI']!r}) must run the Redis store tests")
    pytest.skip(msg)


def _redis_py():
    try:
        import redis
    except ImportError:
        _skip_or_fail("redis-py not installed (pip install -e '.[test]')")
    return redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:<free port>; ``stop()`` terminates it."""

    def __init__(self, exe: str, workdir: str):
        redis = _redis_py()
        last = ""
        for _ in range(3):          # a free port can be taken by someone else meanwhile
            self.port = _free_port()
            log = os.path.join(workdir, f"redis-{self.port}.log")
            with open(log, "wb") as f:
                self.proc = subprocess.Popen(
                    [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", workdir],
                    stdout=f, stderr=subprocess.STDOUT)
            probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
            deadline = time.time() + 20
            while self.proc.poll() is None and time.time() < deadline:
                try:
                    probe.ping()
                    probe.close()
                    return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            self.stop()
            with open(log, "rb") as f:
                last = f.read()[-2000:].decode("utf-8", "replace")
        pytest.fail(f"redis-server did not start on a free loopback port:\n{last}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _start_server(tmp_path_factory) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        _skip_or_fail("redis-server not installed (apt-get install redis-server)")
    return RedisServer(exe, str(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    srv = _start_server(tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL, its db 0 emptied for this test."""
    raw = _redis_py().Redis.from_url(redis_server.url)
    raw.flushdb()
    raw.close()
    return redis_server.url


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:{tmp_path / 'c.db'}")
        assert isinstance(s, SQLiteCacheStore)
    else:
        s = open_store(request.getfixturevalue("redis_url"))
        assert isinstance(s, RedisCacheStore)
    yield s
    s.close()


# ---- data ------------------------------------------------------------------------------------
def _entries():
    rng = np.random.default_rng(0)
    return [CacheEntry("m", 3, u, {"f32": rng.normal(size=(1, 4, 3)).astype(np.float32),
                                   "f64": rng.normal(size=(1, 2)),
                                   "i64": rng.integers(0, 9, size=(1, 5)),
                                   "i32": rng.integers(0, 9, size=(1, 2)).astype(np.int32),
                                   "b": np.array([[True, False]]),
                                   "u8": np.arange(3, dtype=np.uint8)[None],
                                   "empty": np.zeros((1, 0), np.float32)})
            for u in (2, 3, 4)]


def _din_l_tensors(rng, L=24, d=8, short=5):
    """What din_l's user_tower caches (names and shapes as in test_precompute)."""
    return {"keys": rng.normal(size=(1, L, d)).astype(np.float32),
            "mask": rng.random((1, L)) < 0.7,
            "short_item_id": rng.integers(1, 5000, size=(1, short)),
            "short_cate_id": rng.integers(1, 90, size=(1, short)).astype(np.int32)}


def _assert_entry(got, want: CacheEntry):
    assert got is not None, f"no entry for user {want.user_id}"
    assert (got.model_name, got.model_version, got.user_id) == \
        (want.model_name, want.model_version, want.user_id)
    assert list(got.tensors) == list(want.tensors)
    for k, v in want.tensors.items():
        assert got.tensors[k].dtype == v.dtype and got.tensors[k].shape == v.shape, k
        np.testing.assert_array_equal(got.tensors[k], v)


# ---- both backends ---------------------------------------------------------------------------
def test_roundtrip_count_overwrite_delete_threads(store):
    entries = _entries()
    assert store.put_many(entries) == 3
    store.put(("other", 2, 1, {"x": np.ones([1, 2], np.float32)}))
    assert store.count("m") == 3 and store.count() == 4
    for e in entries:
        _assert_entry(store.get("m", e.user_id), e)
        assert store.get_raw("m", e.user_id) == e.to_bytes()
    store.put(CacheEntry("m", 4, 2, {"x": np.zeros([1, 1], np.float32)}))    # overwrite
    assert store.get("m", 2).model_version == 4 and store.count("m") == 3
    assert list(store.get("m", 2).tensors) == ["x"]
    assert store.delete("m", 2) and not store.delete("m", 2)
    assert store.get("m", 2) is None and store.count("m") == 2
    errors = []

    def reader():
        try:
            for _ in range(50):
                assert store.get("m", 3).user_id == 3
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_missing_user_and_model(store):
    assert store.get("m", 7) is None and store.get_raw("m", 7) is None
    store.put(CacheEntry("m", 1, 7, {"x": np.ones([1, 3], np.float32)}))
    assert store.get("m", 8) is None            # another user
    assert store.get("m2", 7) is None           # same user, another model
    assert store.get_many("nope", [7, 8]) == [None, None]
    assert store.count("m2") == 0 and not store.delete("m2", 7)


def test_get_many_batches_in_order(store):
    """1200 users (the Redis store pipelines SETs and MGETs 500 at a time)."""
    rng = np.random.default_rng(1)
    entries = [CacheEntry("din_l", 2, u, _din_l_tensors(rng)) for u in range(1, 1201)]
    assert store.put_many(iter(entries)) == 1200        # any iterable, counted
    assert store.count("din_l") == 1200
    ids = [int(u) for u in rng.permutation(np.arange(1, 1201))] + [5000, 0, 17]
    got = store.get_many("din_l", ids)
    assert len(got) == len(ids)
    for uid, g in zip(ids, got):
        if uid in (5000, 0):
            assert g is None, uid
        else:
            _assert_entry(g, entries[uid - 1])
    assert store.get_many("din_l", []) == []


def test_model_version_travels_in_the_value(store):
    """The key is (model, user): a newer version replaces the entry, models never collide."""
    rng = np.random.default_rng(2)
    v1 = CacheEntry("din_l", 1, 42, _din_l_tensors(rng))
    v2 = CacheEntry("din_l", 2, 42, _din_l_tensors(rng))
    other = CacheEntry("twin", 7, 42, _din_l_tensors(rng, L=6, d=4))
    store.put_many([v1, other])
    store.put(v2)
    assert store.count("din_l") == 1 and store.count("twin") == 1 and store.count() == 2
    _assert_entry(store.get("din_l", 42), v2)
    _assert_entry(store.get("twin", 42), other)


# ---- Redis only ------------------------------------------------------------------------------
def test_redis_keys_and_prefix(redis_url):
    raw = _redis_py().Redis.from_url(redis_url)
    e = CacheEntry("din_l", 3, 42, {"x": np.arange(4, dtype=np.float32)[None]})
    with open_store(redis_url) as s:
        s.put(e)
    assert raw.keys("*") == [b"lifelong:cache:din_l:42"]
    assert raw.get(b"lifelong:cache:din_l:42") == e.to_bytes()
    # another prefix is another namespace on the same server
    with RedisCacheStore(redis_url, prefix="exp2:") as s2:
        assert s2.get("din_l", 42) is None and s2.count() == 0
        s2.put(CacheEntry("din_l", 4, 42, {"x": np.zeros([1, 1], np.float32)}))
        assert s2.get("din_l", 42).model_version == 4
    assert sorted(raw.keys("*")) == [b"exp2:din_l:42", b"lifelong:cache:din_l:42"]
    # a client passed in (the caller's pool) is used and left open by close()
    client = _redis_py().Redis.from_url(redis_url)
    with RedisCacheStore(client=client) as s3:
        assert s3.get("din_l", 42).model_version == 3
    assert client.ping()
    client.close()
    raw.close()


def test_redis_db_from_url(redis_url, redis_server):
    e = CacheEntry("m", 1, 5, {"x": np.ones([1, 1], np.float32)})
    url3 = f"redis://127.0.0.1:{redis_server.port}/3"
    raw3 = _redis_py().Redis.from_url(url3)
    raw3.flushdb()
    with open_store(url3) as s:
        s.put(e)
    with open_store(redis_url) as s0:
        assert s0.get("m", 5) is None
    assert raw3.get(b"lifelong:cache:m:5") == e.to_bytes()
    raw3.flushdb()
    raw3.close()


def test_precompute_cache_records_load_into_redis(tmp_path, redis_url):
    """Real cache records (precompute's TFRecords) -> load_into_store, as
    `lifelong precompute --store redis://...` does: the same bytes as in SQLite."""
    import tensorflow as tf
    from beam_jobs import precompute as P
    rng = np.random.default_rng(3)
    want = {u: _din_l_tensors(rng) for u in range(100, 140)}
    out = tmp_path / "cache"
    out.mkdir()
    with tf.io.TFRecordWriter(str(out / f"{P.OUTPUT_PREFIX}-00000-of-00001{P.SUFFIX}"),
                              options="GZIP") as w:
        for u, t in want.items():
            w.write(P.encode_cache_record("din_l", 6, u, t))
    with open_store(redis_url) as r, SQLiteCacheStore(str(tmp_path / "c.db")) as s:
        rep_r = P.load_into_store(str(out), r, batch=16)
        rep_s = P.load_into_store(str(out), s, batch=16)
        assert rep_r == rep_s and rep_r["loaded"] == len(want)
        assert r.count("din_l") == len(want)
        for u, t in want.items():
            _assert_entry(r.get("din_l", u), CacheEntry("din_l", 6, u, t))
            assert r.get_raw("din_l", u) == s.get_raw("din_l", u)


def test_redis_unreachable_is_a_clear_connection_error():
    _redis_py()
    port = _free_port()          # bound then released: nothing listens there
    t0 = time.time()
    with pytest.raises(RedisUnavailableError) as ei:
        open_store(f"redis://:s3cret@127.0.0.1:{port}/0")
    msg = str(ei.value)
    assert isinstance(ei.value, ConnectionError) and isinstance(ei.value, LifelongError)
    assert f"redis cache store redis://:***@127.0.0.1:{port}/0 is unreachable" in msg, msg
    assert "redis-server" in msg and "sqlite:PATH" in msg, msg
    assert "s3cret" not in msg, msg
    assert time.time() - t0 < 5, "a refused connection must fail at once"


def test_redis_server_gone_after_open(tmp_path_factory):
    """An outage after open: each call raises RedisUnavailableError, not redis-py's error."""
    srv = _start_server(tmp_path_factory)
    try:
        s = open_store(srv.url)
        s.put(CacheEntry("m", 1, 1, {"x": np.ones([1, 1], np.float32)}))
    finally:
        srv.stop()
    for call in (lambda: s.get("m", 1), lambda: s.get_many("m", [1]), lambda: s.count(),
                 lambda: s.put(("m", 2, 1, {"x": np.ones([1, 1], np.float32)})),
                 lambda: s.delete("m", 1)):
        with pytest.raises(RedisUnavailableError, match=f"127.0.0.1:{srv.port}/0 is unreachable"):
            call()
    s.close()


def test_cli_precompute_reports_unreachable_redis_in_one_line(tmp_path, capsys):
    """The store opens (and pings) before the Beam pipeline: one error line, exit 2."""
    _redis_py()
    from lifelong import cli
    port = _free_port()
    rc = cli.main(["precompute", "--records", str(tmp_path / "none-*.tfrecord.gz"),
                   "--model_dir", str(tmp_path / "m" / "1"), "--output", str(tmp_path / "o"),
                   "--store", f"redis://127.0.0.1:{port}/0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(
        f"lifelong precompute: error: redis cache store redis://127.0.0.1:{port}/0 is "
        "unreachable"), err


def test_bad_store_specs():
    """Rejected before redis-py is imported or a socket opened; still ValueErrors."""
    for url in ("redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/zero",
                "redis://127.0.0.1:0/0"):
        with pytest.raises(StoreSpecError, match="must be redis://host:port/db"):
            open_store(url)
    with pytest.raises(StoreSpecError, match="must be redis://host:port/db"):
        RedisCacheStore("rediss://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="unknown cache store 'mongodb://x'"):
        open_store("mongodb://x")
    assert issubclass(StoreSpecError, LifelongError)


def test_missing_redis_py_is_a_clear_error(monkeypatch):
    """Runs with or without redis-py: ``import redis`` is made to fail."""
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(RedisNotInstalledError) as ei:
        open_store("redis://127.0.0.1:6379/0")
    assert isinstance(ei.value, ImportError) and isinstance(ei.value, LifelongError)
    assert "needs redis-py: pip install 'lifelong-ctr[redis]'" in str(ei.value)
    # SQLite needs nothing
    with open_store(":memory:") as s:
        assert s.count() == 0
