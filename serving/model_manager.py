"""The model manager: which versions of which models are served, and swapping them.

Reads ``<base>/models.config`` (TF Serving's ``ModelServerConfig`` text format) when
present, else serves every model folder under ``<base>`` with its latest
``num_versions`` versions. A poller picks up new versions without a restart: a new
version is loaded and warmed up beside the old one, then swapped in with one
assignment; a request holds a reference to the version it started on, so in-flight
requests finish on it and none fails. Folders that resolve outside ``<base>`` are
skipped (:func:`serving.paths.inside`).

Version labels (``version_labels { key: "stable" value: 1 }`` in a model's config, TF
Serving's map) are assigned after each poll's loads, and only to a loaded version:
a label naming a version that is not loaded (not in the policy, not on disk, or its
load failed) is refused with a logged error, as TF Serving refuses assigning a label
to a version that is not yet available (without
``--allow_version_labels_for_unavailable_models``); the label keeps its previous
assignment while that version is still loaded (TF Serving keeps its last good
config), else it is absent and a request naming it is NOT_FOUND with the reason.
[interp] TF Serving refuses the whole config reload; this server refuses only the
label and serves the rest of the config.

``on_load(name, version, seconds, ok)``, when given, is called after each load
attempt (load + warm-up time; the server's metrics).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from tensorflow_serving.apis import get_model_status_pb2

from serving.errors import not_found
from serving.paths import inside
from serving.servable import SavedModelServable, Servable, SessionThreads

log = logging.getLogger("serving.server")

State = get_model_status_pb2.ModelVersionStatus.State
_NUMERIC = re.compile(r"[0-9]{1,18}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclasses.dataclass
class ModelConfig:
    name: str
    path: str
    policy: str = "latest"              # latest | all | specific
    num_versions: int = 2
    versions: Tuple[int, ...] = ()
    labels: Dict[str, int] = dataclasses.field(default_factory=dict)


class ModelManager:
    """Loads, swaps and unloads versions; thread-safe reads via immutable snapshots."""

    def __init__(self, base: str, poll_interval_s: float = 2.0, num_versions: int = 2,
                 warmup: bool = True, servable_factory: Optional[Callable] = None,
                 threads: Optional[SessionThreads] = None,
                 on_load: Optional[Callable[[str, int, float, bool], None]] = None):
        if servable_factory is None:
            servable_factory = functools.partial(SavedModelServable,
                                                 threads=threads or SessionThreads())
        self.base = base
        self.poll_interval_s = poll_interval_s
        self.num_versions = num_versions
        self.warmup = warmup
        self.factory = servable_factory
        self._models: Dict[str, Dict[int, Servable]] = {}
        self._status: Dict[str, Dict[int, Tuple[int, str]]] = {}
        self._labels: Dict[str, Dict[str, int]] = {}
        self._refused: Dict[str, Dict[str, str]] = {}     # model -> label -> why refused
        self.on_load = on_load
        self._static: Dict[str, Dict[int, Servable]] = {}
        self._failed: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- configuration -------------------------------------------------------------------------
    def add_static(self, servable: Servable) -> None:
        """Serve an in-memory servable (e.g. the benchmark's identity floor) beside the
        folder."""
        with self._lock:
            self._static.setdefault(servable.name, {})[servable.version] = servable
            models = dict(self._models)
            models[servable.name] = dict(self._static[servable.name])
            self._models = models
            self._status.setdefault(servable.name, {})[servable.version] = (State.AVAILABLE, "")

    def read_config(self) -> List[ModelConfig]:
        path = os.path.join(self.base, "models.config")
        if os.path.exists(path):
            return self._parse_config(path)
        out = []
        if os.path.isdir(self.base):
            for name in sorted(os.listdir(self.base)):
                p = os.path.join(self.base, name)
                if _NAME.match(name) and os.path.isdir(p) and inside(self.base, p):
                    out.append(ModelConfig(name, p, num_versions=self.num_versions))
        return out

    def _parse_config(self, path: str) -> List[ModelConfig]:
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2 as msc
        config = msc.ModelServerConfig()
        with open(path) as f:
            text_format.Parse(f.read(), config)
        out = []
        for c in config.model_config_list.config:
            if not _NAME.match(c.name):
                log.warning("models.config: skipping model with unsafe name %r", c.name)
                continue
            local = c.base_path if os.path.isdir(c.base_path) else os.path.join(self.base, c.name)
            if not inside(self.base, local):
                log.warning("models.config: %r resolves outside %s; skipped", c.name, self.base)
                continue
            pol = c.model_version_policy
            which = pol.WhichOneof("policy_choice")
            mc = ModelConfig(c.name, local, labels=dict(c.version_labels))
            if which == "all":
                mc.policy = "all"
            elif which == "specific":
                mc.policy, mc.versions = "specific", tuple(int(v) for v in pol.specific.versions)
            else:
                mc.num_versions = (pol.latest.num_versions if which == "latest"
                                   and pol.latest.num_versions else 1)
            out.append(mc)
        return out

    @staticmethod
    def _wanted(mc: ModelConfig) -> List[int]:
        if not os.path.isdir(mc.path):
            return []
        found = sorted(int(v) for v in os.listdir(mc.path)
                       if _NUMERIC.fullmatch(v) and os.path.isdir(os.path.join(mc.path, v)))
        if mc.policy == "all":
            return found
        if mc.policy == "specific":
            return [v for v in found if v in mc.versions]
        return found[-mc.num_versions:]

    # -- loading -------------------------------------------------------------------------------
    def _set_status(self, name, version, state, msg=""):
        with self._lock:
            status = {k: dict(v) for k, v in self._status.items()}
            status.setdefault(name, {})[version] = (state, msg)
            self._status = status

    def refresh(self) -> None:
        """One poll: load wanted versions that are new, swap, drop unwanted ones."""
        with self._refresh_lock:
            try:
                configs = self.read_config()
            except Exception as e:
                log.error("cannot read the model config under %s: %s", self.base, e)
                return
            seen = set()
            for mc in configs:
                seen.add(mc.name)
                current = self._models.get(mc.name, {})
                wanted = self._wanted(mc)
                new = {v: s for v, s in current.items() if v in wanted}
                for v in wanted:
                    if v in new:
                        continue
                    vpath = os.path.join(mc.path, str(v))
                    key = os.path.realpath(vpath)
                    mtime = os.path.getmtime(vpath)
                    if self._failed.get(key) == mtime:
                        continue
                    self._set_status(mc.name, v, State.LOADING)
                    t0 = time.perf_counter()
                    try:
                        servable = self.factory(mc.name, v, vpath)
                        if self.warmup and hasattr(servable, "warmup"):
                            servable.warmup()
                        new[v] = servable
                        self._set_status(mc.name, v, State.AVAILABLE)
                        log.info("loaded %s version %d in %.1fs", mc.name, v,
                                 time.perf_counter() - t0)
                        self._loaded(mc.name, v, t0, True)
                    except Exception as e:
                        self._failed[key] = mtime
                        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                        self._set_status(mc.name, v, State.END, f"load failed: {msg}")
                        log.error("loading %s version %d failed: %s", mc.name, v, msg)
                        self._loaded(mc.name, v, t0, False)
                new.update(self._static.get(mc.name, {}))
                assigned, refused = self._assign_labels(mc, new)
                with self._lock:
                    models = dict(self._models)
                    models[mc.name] = new       # the swap: one assignment of a new dict
                    self._models = models
                    labels = dict(self._labels)
                    labels[mc.name] = assigned
                    self._labels = labels
                    refusals = dict(self._refused)
                    refusals[mc.name] = refused
                    self._refused = refusals
                for v in set(current) - set(new):
                    self._set_status(mc.name, v, State.END, "unloaded (version policy)")
                    log.info("unloaded %s version %d", mc.name, v)
            with self._lock:
                gone = [n for n in self._models if n not in seen and n not in self._static]
                if gone:
                    models = {k: v for k, v in self._models.items() if k not in gone}
                    self._models = models
            for n in gone:
                for v in list(self._status.get(n, {})):
                    self._set_status(n, v, State.END, "model removed from the config")

    def _loaded(self, name: str, version: int, t0: float, ok: bool) -> None:
        if self.on_load is not None:
            try:
                self.on_load(name, version, time.perf_counter() - t0, ok)
            except Exception:   # metrics never break loading
                log.exception("on_load callback failed")

    def _assign_labels(self, mc: ModelConfig, loaded: Dict[int, Servable]
                       ) -> Tuple[Dict[str, int], Dict[str, str]]:
        """The labels of ``mc`` that name a loaded version; the others refused (reason)."""
        previous = self._labels.get(mc.name, {})
        assigned, refused = {}, {}
        for label, v in sorted(mc.labels.items()):
            v = int(v)
            if v in loaded:
                assigned[label] = v
                continue
            why = (f"models.config assigns it to version {v}, which is not loaded (loaded "
                   f"versions: {sorted(loaded)}); a label may only name an available version")
            refused[label] = why
            if self._refused.get(mc.name, {}).get(label) != why:   # log once per change
                log.error("model '%s': version label '%s' refused: %s", mc.name, label, why)
            if previous.get(label) in loaded:     # keep the last good assignment
                assigned[label] = previous[label]
        return assigned, refused

    def labels(self, name: str) -> Dict[str, int]:
        """The version labels assigned now (label -> loaded version)."""
        return dict(self._labels.get(name, {}))

    def start(self) -> None:
        self.refresh()
        if self.poll_interval_s > 0:
            self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep polling whatever happens
                log.exception("model refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- lookups -------------------------------------------------------------------------------
    def model_names(self) -> List[str]:
        return sorted(self._models)

    def get(self, name: str, version: Optional[int] = None,
            label: Optional[str] = None) -> Servable:
        versions = self._models.get(name)
        if versions is None:
            raise not_found(f"model '{name}' not found; serving: "
                            f"{', '.join(self.model_names()) or 'none'}")
        if label:
            v = self._labels.get(name, {}).get(label)
            if v is None:
                why = self._refused.get(name, {}).get(label)
                raise not_found(f"model '{name}' has no version label '{label}'"
                                + (f": {why}" if why else ""))
            if v not in versions:
                raise not_found(f"model '{name}' version label '{label}' names version {v}, "
                                f"which is no longer loaded; loaded versions: "
                                f"{sorted(versions)}")
            version = v
        if not versions:
            raise not_found(f"model '{name}' has no loaded version")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise not_found(f"model '{name}' version {version} not found; loaded versions: "
                            f"{sorted(versions)}")
        return versions[version]

    def status(self, name: str) -> Dict[int, Tuple[int, str]]:
        if name not in self._status:
            raise not_found(f"model '{name}' not found; serving: "
                            f"{', '.join(self.model_names()) or 'none'}")
        return dict(self._status[name])
