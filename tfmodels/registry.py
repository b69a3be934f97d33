"""Model registry: model name -> long-sequence module, imported lazily.

An entry is ``None`` (no long module: DIN on the short sequence only),
``"module:Class"``, or ``("module:Class", {preset kwargs})`` for a named variant
such as a paper's ablation (the preset is merged under the user's
``long_module_config``). Adding a method = one new file under
``tfmodels/methods/`` + one line here (plus one line per named ablation).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple, Type, Union

from tfmodels.errors import LifelongError

Entry = Union[None, str, Tuple[str, Dict]]

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
    "twin_v2": "tfmodels.methods.twin_v2:TwinV2",         # 2.4: TWIN V2 (alpha + ln n)
    "twin_v2_no_ln_gsu": ("tfmodels.methods.twin_v2:TwinV2", {"gsu_log_n": False}),
    "twin_v2_no_ln_esu": ("tfmodels.methods.twin_v2:TwinV2", {"esu_log_n": False}),
    "lrea": "tfmodels.methods.lrea:LREA",                 # 2.3: low-rank efficient attention
    "lrea_linear": "tfmodels.methods.lrea:LREALinear",    # 2.3 with phi linear (exact absorption)
    "lrea_count": ("tfmodels.methods.lrea:LREA", {"normalize": "count"}),   # 2.3 R4: v / n
    "encode": ("tfmodels.methods.encode:Encode", {}),     # 2.2 ENCODE
    "encode_no_loss": ("tfmodels.methods.encode:Encode", {"reduction_loss": False}),
    "encode_fixed_margin": ("tfmodels.methods.encode:Encode", {"margin": "fixed"}),
    "encode_dot": ("tfmodels.methods.encode:Encode", {"online_metric": "dot"}),
    "cformer": "tfmodels.methods.cformer:CFormer",        # 2.1: C-Former (cached centroids)
    "cformer_wo_denoise": ("tfmodels.methods.cformer:CFormer", {"denoise": False}),
    "cformer_wo_recon": ("tfmodels.methods.cformer:CFormer", {"reconstruction": False}),
    "cformer_wo_orth": ("tfmodels.methods.cformer:CFormer", {"orthogonality": False}),
    "cformer_sum": ("tfmodels.methods.cformer:CFormer", {"centroid_norm": "sum"}),  # C12 as printed
}


class UnknownModelError(KeyError, LifelongError):
    def __str__(self):
        return self.args[0]


def names():
    return sorted(MODELS)


def _entry(name: str) -> Tuple[Optional[str], Dict]:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(names())}")
    entry = MODELS[name]
    if entry is None or isinstance(entry, str):
        return entry, {}
    return entry[0], dict(entry[1])


def long_module_class(name: str) -> Optional[Type]:
    target, _ = _entry(name)
    if target is None:
        return None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def preset_config(name: str) -> Dict:
    """The variant's preset long-module kwargs (empty for plain entries)."""
    return _entry(name)[1]
