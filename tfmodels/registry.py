"""Model registry: model name -> long-sequence module (imported lazily) and what it declares.

An entry is ``None`` (no long module: DIN on the short sequence only),
``"module:Class"``, ``("module:Class", {preset kwargs})`` for a named variant
such as a paper's ablation (the preset is merged under the user's
``long_module_config``), or a :class:`Method` when the method declares more:

* ``needs``: inputs its module reads beyond the standard per-user records
  (:data:`INPUTS`; e.g. :data:`CLUSTERED_HISTORY`, the output of ``lifelong
  cluster``), so ``lifelong compare`` trains it on the right dataset;
* ``reports``: ``lifelong`` subcommands it brings (:class:`Report`; each is
  implemented by ``lifelong/reports/<command with _>.py``), so the CLI lists them.

The floors above (``lifelong/``) consult these declarations instead of naming
methods. Adding a method = one new file under ``tfmodels/methods/`` + one entry
here (plus one line per named ablation, which repeats the method's ``needs``).
This module imports nothing heavy: the CLI reads it to build ``--help``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, List, Mapping, Optional, Tuple, Type, Union

from tfmodels.errors import LifelongError

#: An input a module may read beyond the standard per-user records: a clustered
#: history (TWIN V2's virtual items with their ``cluster_size``, METHODS 2.4).
CLUSTERED_HISTORY = "clustered_history"
#: every declarable input -> how a user makes it (quoted in error messages)
INPUTS: Dict[str, str] = {
    CLUSTERED_HISTORY: "a clustered history: run `lifelong cluster --data {data} --output "
                       "CLUSTERED` and pass --clustered CLUSTERED (or --prepared CLUSTERED)",
}


@dataclasses.dataclass(frozen=True)
class Report:
    """A ``lifelong <command>`` a method brings, implemented by the module
    ``lifelong.reports.<command with - as _>`` (``add_arguments(parser)``,
    ``run(args, extra)``; optional ``ALLOW_EXTRA = True`` when it takes unknown flags)."""
    command: str
    help: str


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry entry that declares more than its module and preset."""
    target: Optional[str]                         # "module:Class"; None: no long module
    preset: Mapping = dataclasses.field(default_factory=dict)
    needs: Tuple[str, ...] = ()                   # keys of INPUTS
    reports: Tuple[Report, ...] = ()


Entry = Union[None, str, Tuple[str, Dict], Method]

LREA_GRID = Report("lrea-grid", "LREA sensitivity grid over rank r and lambda (one command)")
CLUSTER_QUALITY = Report("cluster-quality", "C-Former vs K-means silhouette on a trained run")
ENCODE_REPORT = Report("encode-report", "ENCODE: triplet order preservation of the trained "
                       "reduction W_h vs a random projection")
LCN_CONSISTENCY = Report("lcn-consistency", "LCN: share of FSA's whole-window top-K2 that "
                         "LAP's earlier levels keep, per K1 (table, PNG, JSON)")
_CLUSTERED = (CLUSTERED_HISTORY,)

MODELS: Dict[str, Entry] = {
    "din": None,                                          # B2: short sequence only
    "din_l": "tfmodels.methods.din_long:DinLong",         # B3: DIN over the long sequence
    # B3 with the un-normalised DIN unit (G2 as printed), whatever the backbone's
    # din_normalize: LREA's like-for-like baseline (METHODS 2.3 R4)
    "din_l_none": ("tfmodels.methods.din_long:DinLong", {"din_normalize": "none"}),
    "avg_pool": "tfmodels.methods.avg_pool:AvgPooling",   # B1: mean of the long sequence
    "sim_hard": "tfmodels.methods.sim:SimHard",           # B4: same-category top-k + ESU
    "sim_soft": "tfmodels.methods.sim:SimSoft",           # B5: inner-product top-k + ESU
    "eta": "tfmodels.methods.eta:ETA",                    # B6: SimHash Hamming top-k + ESU
    "sdim": "tfmodels.methods.sdim:SDIM",                 # B7: SimHash bucket sums
    "twin": "tfmodels.methods.twin:Twin",                 # B9: TWIN (GSU top-100 + 4-head ESU)
    "twin_v2": Method("tfmodels.methods.twin_v2:TwinV2", needs=_CLUSTERED),  # 2.4: alpha + ln n
    "twin_v2_no_ln_gsu": Method("tfmodels.methods.twin_v2:TwinV2", {"gsu_log_n": False},
                                needs=_CLUSTERED),
    "twin_v2_no_ln_esu": Method("tfmodels.methods.twin_v2:TwinV2", {"esu_log_n": False},
                                needs=_CLUSTERED),
    "lrea": Method("tfmodels.methods.lrea:LREA",          # 2.3: low-rank efficient attention
                   reports=(LREA_GRID,)),
    "lrea_linear": "tfmodels.methods.lrea:LREALinear",    # 2.3 with phi linear (exact absorption)
    "lrea_count": ("tfmodels.methods.lrea:LREA", {"normalize": "count"}),   # 2.3 R4: v / n
    "encode": Method("tfmodels.methods.encode:Encode", reports=(ENCODE_REPORT,)),  # 2.2
    "encode_no_loss": ("tfmodels.methods.encode:Encode", {"reduction_loss": False}),
    "encode_fixed_margin": ("tfmodels.methods.encode:Encode", {"margin": "fixed"}),
    "encode_dot": ("tfmodels.methods.encode:Encode", {"online_metric": "dot"}),
    "cformer": Method("tfmodels.methods.cformer:CFormer",  # 2.1: C-Former (cached centroids)
                      reports=(CLUSTER_QUALITY,)),
    "cformer_wo_denoise": ("tfmodels.methods.cformer:CFormer", {"denoise": False}),
    "cformer_wo_recon": ("tfmodels.methods.cformer:CFormer", {"reconstruction": False}),
    "cformer_wo_orth": ("tfmodels.methods.cformer:CFormer", {"orthogonality": False}),
    "cformer_sum": ("tfmodels.methods.cformer:CFormer", {"centroid_norm": "sum"}),  # C12 as printed
    # 2.5: LCN's LAP, LCN-200-50 (CRP is a backbone option, not part of the module);
    # Table 3 rows "K1 = 50 only" (CSA -> FSA) and "K2 = 50 only" (MSA over all L -> FSA)
    "lcn": Method("tfmodels.methods.lcn:LAP", reports=(LCN_CONSISTENCY,)),
    "lcn_k1_only": ("tfmodels.methods.lcn:LAP", {"levels": ["csa", "fsa"], "k1": 50}),
    "lcn_k2_only": ("tfmodels.methods.lcn:LAP", {"levels": ["msa", "fsa"], "k2": 50}),
}


class UnknownModelError(KeyError, LifelongError):
    def __str__(self):
        return self.args[0]


def names():
    return sorted(MODELS)


def method(name: str) -> Method:
    """The entry of ``name`` in its full form (legacy forms declare no needs or reports);
    ``target`` is None for a model without a long module."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(names())}")
    entry = MODELS[name]
    if isinstance(entry, Method):
        return entry
    if entry is None or isinstance(entry, str):
        return Method(entry)
    return Method(entry[0], dict(entry[1]))


def _entry(name: str) -> Tuple[Optional[str], Dict]:
    m = method(name)
    return m.target, dict(m.preset)


def long_module_class(name: str) -> Optional[Type]:
    target, _ = _entry(name)
    if target is None:
        return None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def preset_config(name: str) -> Dict:
    """The variant's preset long-module kwargs (empty for plain entries)."""
    return _entry(name)[1]


def needs(name: str) -> Tuple[str, ...]:
    """The inputs (keys of :data:`INPUTS`) model ``name`` reads beyond the standard records."""
    return tuple(method(name).needs)


def needing(input_name: str) -> List[str]:
    """Registered models that declare ``input_name`` among their needs, in registry order."""
    return [n for n in MODELS if input_name in needs(n)]


def reports() -> Dict[str, Tuple[Report, List[str]]]:
    """Every report command declared in the registry -> (its :class:`Report`, the models
    declaring it), in registry order. Two declarations of one command must agree."""
    out: Dict[str, Tuple[Report, List[str]]] = {}
    for n in MODELS:
        for r in method(n).reports:
            if r.command in out and out[r.command][0] != r:
                raise ValueError(f"report {r.command!r} is declared twice with different "
                                 f"help: {out[r.command][0]} vs {r}")
            out.setdefault(r.command, (r, []))[1].append(n)
    return out
