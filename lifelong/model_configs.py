"""Per-model configs, one file per dataset and model, as FuxiCTR keeps them (issue 22.1).

Layout (docs/configs.md)::

    configs/<dataset>/<name>.json     e.g. configs/movielens/cformer.json
    configs/default/<name>.json       used for a dataset that has no file of that name

``<dataset>`` is the ``source`` field of the prepared data's ``meta.json``
(``movielens``, ``synthetic``, ``taobao``, ...). A file holds any field of
:class:`tfmodels.train.TrainConfig` except the per-run ones (``model``, ``data``,
``out_dir``, ``seed``), with ``long_module_config`` (the method's
hyper-parameters) checked against the method's constructor; keys starting with
``_`` are comments (``_comment``, ``_sources``: which value comes from the paper
and which is ours). ``"base": "NAME"`` inherits every field of config ``NAME``
(looked up the same way, or the registered model's built-in values when there is
no file) and overrides some: this is how an ablation is a config. The model trained
is the first *registered* name along ``name -> base -> base ...``; a registered
ablation preset (``cformer_sum``) keeps its preset values even where its base's
file sets the same key (tfmodels/registry.py defines the ablation).

Precedence, lowest to highest::

    TrainConfig defaults < the model's config file (its base first)
      < --config FILE < explicit flags < --set NAME.FIELD=VALUE (one model)

``long_module_config`` merges key by key across these layers; every other field
is replaced. Values in a config file's ``long_module_config`` that equal the
defaults of the model the file configures (the registry preset's, else the
constructor's) are documentation: they are checked, then left out of the resolved
config, so a run recorded before config files existed (``{}``) is the same
training as one with the file (``compare --resume`` reuses it), and a base's
restated defaults do not override a derived model's own (``lrea_linear``'s phi).
A model with no config file resolves exactly as before this module existed.

Errors a user can cause (an unknown field, an unknown model, a bad value, a
``--set`` for a model that is not being trained) raise :class:`ModelConfigError`
naming the file (or flag) and the field, before anything is trained.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from tfmodels.errors import UsageError

#: the repository's configs/ (next to the lifelong package in a source checkout)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs")
DEFAULT_DATASET = "default"
BASE = "base"
#: TrainConfig fields that belong to one run, not to a model's config
PER_RUN = ("model", "data", "out_dir", "seed")
#: long-module kwargs the backbone fills with its own values when a config leaves them
#: out (tfmodels/model.py): never dropped as "equal to the default"
INJECTED = ("din_hidden", "din_normalize")
LMC = "long_module_config"


class ModelConfigError(UsageError):
    """A bad model config file, ``--set`` or ``--config_dir`` (one line, exit 2)."""


@dataclasses.dataclass
class ModelConfig:
    """A config name resolved for one dataset: the registered model it trains, the
    files read (base first) and their merged fields (the config-file layer)."""
    name: str
    model: str
    dataset: Optional[str]
    files: List[str]
    fields: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---- where the files are ------------------------------------------------------------------
def config_root(path: Optional[str] = None) -> Optional[str]:
    """The configs folder: ``path`` (``--config_dir``), or the repository's ``configs/``
    when it exists; ``"none"`` turns model config files off (today's behaviour)."""
    if path is None:
        return CONFIG_DIR if os.path.isdir(CONFIG_DIR) else None
    if str(path).lower() == "none":
        return None
    if not os.path.isdir(path):
        raise ModelConfigError(f"--config_dir {path!r} is not a directory")
    return path


def dataset_of(data_dir: Optional[str]) -> Optional[str]:
    """The ``source`` field of a prepared dataset's meta.json (None when unreadable:
    the caller reports a missing dataset itself)."""
    if not data_dir:
        return None
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            source = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return str(source) if source else None


def find_file(name: str, dataset: Optional[str], root: Optional[str]) -> Optional[str]:
    """``root/<dataset>/<name>.json``, else ``root/default/<name>.json``, else None."""
    if root is None:
        return None
    for folder in dict.fromkeys(f for f in (dataset, DEFAULT_DATASET) if f):
        path = os.path.join(root, folder, f"{name}.json")
        if os.path.isfile(path):
            return path
    return None


def config_names(root: Optional[str]) -> List[str]:
    """Every config name that has a file in some folder of ``root``."""
    if root is None:
        return []
    out = set()
    for folder in sorted(os.listdir(root)):
        d = os.path.join(root, folder)
        if os.path.isdir(d):
            out.update(f[:-5] for f in os.listdir(d) if f.endswith(".json"))
    return sorted(out)


# ---- field checks -------------------------------------------------------------------------
def train_defaults() -> Dict[str, Any]:
    """Every TrainConfig field with its default value."""
    from tfmodels.train import TrainConfig
    return {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}


def _type_error(where: str, field: str, value: Any, default: Any) -> Optional[str]:
    """Why ``value`` cannot stand for a TrainConfig field whose default is ``default``
    (the dataclass's annotations are strings here, so the default's type is the rule)."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, list) and any(isinstance(x, float) for x in default):
        ok = isinstance(value, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
        want = "a list of numbers, e.g. [1, 1, 0]"          # crp_lambdas
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value)
        want = "a list of integers, e.g. [200, 80]"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a JSON object"
    else:
        return None
    return None if ok else f"{where}: field {field!r} must be {want}, got {value!r}"


def module_parameters(model: str) -> Optional[Dict[str, Any]]:
    """The keyword parameters (with defaults) of a registered model's long module, over
    its class and the method classes it derives from (a subclass's default wins); None
    for a model without a long module. ``emb_dim`` is the backbone's, not a kwarg."""
    from tfmodels import registry
    cls = registry.long_module_class(model)
    if cls is None:
        return None
    out: Dict[str, Any] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith("tfmodels."):
            break                       # tf_keras' Layer: name, dtype, ... are not config
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name in ("self", "emb_dim") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out.setdefault(p.name, p.default)
    return out


def _json_equal(a: Any, b: Any) -> bool:
    """Equal once written as JSON (tuples and lists alike)."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except TypeError:
        return a == b


def check_long_module_config(model: str, config: Mapping, where: Mapping[str, str]) -> None:
    """Every key of ``config`` must be a parameter of the model's long module;
    ``where[key]`` names the file or flag that set it (for the message)."""
    if not config:
        return
    from tfmodels import registry
    params = module_parameters(model)
    for key in config:
        origin = where.get(key, "--long_module_config")
        if params is None:
            raise ModelConfigError(
                f"{origin}: field '{LMC}.{key}': model {model!r} has no long module "
                f"(its {LMC} must be empty)")
        if key not in params:
            target = registry.method(model).target
            raise ModelConfigError(
                f"{origin}: field '{LMC}.{key}' is not a parameter of {model!r} ({target}); "
                f"its parameters: {', '.join(sorted(params))}"
                + (f". Give a key to one model only with --set NAME.{LMC}.{key}=VALUE"
                   if origin.startswith(("--long_module_config", "--config")) else ""))


def _restating(model: str, config: Mapping[str, Any]) -> List[str]:
    """The keys of ``config`` whose value equals the model's own default (its registry
    preset's, else its constructor's); never the keys the backbone fills (INJECTED)."""
    if not config:
        return []
    from tfmodels import registry
    effective = {**(module_parameters(model) or {}), **registry.preset_config(model)}
    return [k for k, v in config.items()
            if k not in INJECTED and k in effective and _json_equal(v, effective[k])]


# ---- loading one config name --------------------------------------------------------------
def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def _check_file(path: str, raw: Mapping, defaults: Mapping) -> None:
    for key, value in raw.items():
        if key.startswith("_"):
            continue                                        # a comment
        if key == BASE:
            if not isinstance(value, str) or not value:
                raise ModelConfigError(f"{path}: field 'base' must be a config name, "
                                       f"got {value!r}")
            continue
        if key in PER_RUN:
            raise ModelConfigError(f"{path}: field {key!r} is set per run (a flag of "
                                   f"train / compare), not in a model config")
        if key not in defaults:
            known = sorted(k for k in defaults if k not in PER_RUN)
            raise ModelConfigError(f"{path}: unknown field {key!r}; known fields: "
                                   f"{', '.join(known)}, base, _comments")
        err = _type_error(path, key, value, defaults[key])
        if err:
            raise ModelConfigError(err)


def load(name: str, dataset: Optional[str] = None, root: Optional[str] = None
         ) -> ModelConfig:
    """Resolve config ``name`` for ``dataset``: its file (or none), its base chain, the
    registered model it trains, and the merged file fields (see the module docstring)."""
    from tfmodels import registry
    defaults = train_defaults()
    chain: List[Tuple[str, Optional[str], Dict[str, Any]]] = []     # (name, path, raw)
    current: Optional[str] = name
    while current is not None:
        if current in [n for n, _, _ in chain]:
            raise ModelConfigError(f"{chain[-1][1]}: base chain loops: "
                                   + " -> ".join([n for n, _, _ in chain] + [current]))
        path = find_file(current, dataset, root)
        if path is None:
            if current not in registry.MODELS:
                if not chain:
                    where = (f"no config file {name}.json in {root}/{dataset or DEFAULT_DATASET}"
                             f" or {root}/{DEFAULT_DATASET}" if root else "model configs off")
                    raise ModelConfigError(f"unknown model {name!r} ({where}); registered: "
                                           f"{', '.join(registry.names())}")
                raise ModelConfigError(f"{chain[-1][1]}: field 'base': {current!r} is neither "
                                       f"a registered model nor a config file")
            chain.append((current, None, {}))
            break                      # a registered model without a file: built-in values
        raw = _read(path)
        _check_file(path, raw, defaults)
        chain.append((current, path, raw))
        current = raw.get(BASE)
    names = [n for n, _, _ in chain]
    model = next((n for n in names if n in registry.MODELS), None)
    if model is None:
        raise ModelConfigError(f"{chain[0][1]}: names no registered model (base chain "
                               f"{' -> '.join(names)}); set 'base' to one of: "
                               f"{', '.join(registry.names())}")
    preset = registry.preset_config(model)
    fields: Dict[str, Any] = {}
    lmc: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for i in reversed(range(len(chain))):                    # base first
        _, path, raw = chain[i]
        # the registered model this file configures (a file past `model` in the chain,
        # e.g. a shared training block, configures `model`)
        own_model = next((n for n in names[i:] if n in registry.MODELS), model)
        for key, value in raw.items():
            if key.startswith("_") or key == BASE:
                continue
            if key != LMC:
                fields[key] = value
                continue
            check_long_module_config(own_model, value, {k: path for k in value})
            own = _restating(own_model, value)
            for k, v in value.items():
                if k in own:
                    continue           # the file's model's own default: documentation
                if own_model != model and k in preset:
                    continue           # the registry preset defines this ablation
                lmc[k], origin[k] = v, path
    check_long_module_config(model, lmc, origin)
    restated = _restating(model, lmc)
    lmc = {k: v for k, v in lmc.items() if k not in restated}
    if lmc:
        fields[LMC] = lmc
    return ModelConfig(name=name, model=model, dataset=dataset,
                       files=[p for _, p, _ in reversed(chain) if p], fields=fields)


# ---- --set NAME.FIELD[.KEY]=VALUE ---------------------------------------------------------
def parse_sets(items: Optional[Iterable[str]]) -> Dict[str, Dict[str, Any]]:
    """``--set`` items -> {config name: {field: value}} (``long_module_config.KEY``
    collects into one dict). VALUE is JSON when it parses (``32``, ``0.001``,
    ``true``, ``[64,32]``, ``{"a":1}``), else the plain string (``adagrad``)."""
    out: Dict[str, Dict[str, Any]] = {}
    defaults = None
    for item in items or ():
        target, eq, text = str(item).partition("=")
        parts = target.strip().split(".")
        if not eq or len(parts) < 2 or not all(parts):
            raise ModelConfigError(f"--set {item!r}: expected NAME.FIELD=VALUE, e.g. "
                                   f"--set cformer.{LMC}.num_clusters=32 or "
                                   f"--set din_l.learning_rate=0.001")
        name, field, rest = parts[0], parts[1], parts[2:]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        defaults = defaults or train_defaults()
        where = f"--set {target}"
        if field in PER_RUN or field not in defaults:
            known = sorted(k for k in defaults if k not in PER_RUN)
            raise ModelConfigError(f"{where}: unknown field {field!r}; known fields: "
                                   f"{', '.join(known)}")
        entry = out.setdefault(name, {})
        if rest:
            if field != LMC or len(rest) != 1:
                raise ModelConfigError(f"{where}: only {LMC} takes a key "
                                       f"(NAME.{LMC}.KEY=VALUE)")
            entry.setdefault(LMC, {})[rest[0]] = value
            continue
        err = _type_error(where, field, value, defaults[field])
        if err:
            raise ModelConfigError(err)
        if field == LMC:
            entry.setdefault(LMC, {}).update(value)
        else:
            entry[field] = value
    return out


# ---- the layers ---------------------------------------------------------------------------
def _layer(d: Dict[str, Any], top: Mapping[str, Any]) -> None:
    """Put ``top`` over ``d``; ``long_module_config`` merges key by key."""
    for key, value in top.items():
        if key == LMC and isinstance(value, Mapping) and isinstance(d.get(LMC), Mapping):
            d[LMC] = {**d[LMC], **value}
        else:
            d[key] = value


def resolve(args, config_file: Mapping[str, Any], flags: Mapping[str, Any],
            overrides: Mapping[str, Any]) -> Tuple[Dict[str, Any], ModelConfig]:
    """The TrainConfig dict of one run and its :class:`ModelConfig`: defaults < the model's
    config file < ``config_file`` (``--config``) < ``flags`` (explicit) < the ``--set``
    items of this model < ``overrides`` (per run, from the caller; replaced whole).

    The config name is ``overrides['model']`` (compare), else ``--model``, else the
    ``--config`` file's, else TrainConfig's default; ``--config_dir`` and ``--set``
    are read from ``args`` when it has them (lrea-grid's parser has neither)."""
    from tfmodels.train import TrainConfig
    if BASE in config_file:
        raise ModelConfigError(f"--config {getattr(args, 'config', '')}: field 'base' works in "
                               f"files under the configs folder only; pass --model NAME "
                               f"(and --config_dir DIR) instead")
    config_file = {k: v for k, v in config_file.items() if not k.startswith("_")}
    name = overrides.get("model") or flags.get("model") or config_file.get("model") \
        or TrainConfig.model
    data = overrides.get("data") or flags.get("data") or config_file.get("data") or ""
    root = config_root(getattr(args, "config_dir", None))
    mc = load(name, dataset_of(data), root)
    sets = parse_sets(getattr(args, "set", None))
    if sets and not overrides.get("model"):         # `lifelong train`: one model
        stray = [n for n in sets if n != name]
        if stray:
            raise ModelConfigError(f"--set {stray[0]}.FIELD: {stray[0]!r} is not the model being "
                                   f"trained ({name!r})")
    d: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for layer, label in ((mc.fields, (mc.files or ["(built-in)"])[-1]),
                         (config_file, f"--config {getattr(args, 'config', '')}"),
                         (flags, f"--{LMC}"), (sets.get(name, {}), f"--set {name}.{LMC}")):
        _layer(d, layer)
        for key in (layer.get(LMC) or {}) if isinstance(layer.get(LMC), Mapping) else ():
            origin[key] = label
    d.update(overrides)
    d["model"] = mc.model
    if isinstance(d.get(LMC), Mapping):
        check_long_module_config(mc.model, d[LMC], origin)
    return d, mc


def check_names(names: Iterable[str], args) -> None:
    """Before any work: every name is a registered model or has a config file, and every
    ``--set`` names one of them."""
    from tfmodels import registry
    root = config_root(getattr(args, "config_dir", None))
    files = set(config_names(root))
    names = list(names)
    for n in names:
        if n not in registry.MODELS and n not in files:
            raise ModelConfigError(
                f"unknown model {n!r}; registered: {', '.join(registry.names())}"
                + (f"; config files: {', '.join(sorted(files - set(registry.MODELS)))}"
                   if files - set(registry.MODELS) else ""))
    for n in parse_sets(getattr(args, "set", None)):
        if n not in names:
            raise ModelConfigError(f"--set {n}.FIELD: {n!r} is not among --models "
                                   f"({', '.join(names)})")
