"""``lifelong bench serving --rank_models``: the default times every registered cacheable
method (issue 20 item 6); named variants, ``din`` and unknown names are handled."""
import pytest

from lifelong.bench.serving import cacheable_models, resolve_rank_models
from tfmodels.errors import LifelongError


def test_all_is_every_method_with_a_cache_once():
    models = cacheable_models()
    for m in ("avg_pool", "din_l", "cformer", "encode", "lrea", "twin", "twin_v2",
              "sim_hard", "sim_soft", "eta", "sdim", "lcn"):
        assert m in models
    # no long module (nothing cached) / a preset variant of a listed method
    for m in ("din", "din_l_none", "encode_no_loss", "twin_v2_no_ln_gsu", "lcn_k1_only",
              "cformer_sum", "lrea_count"):
        assert m not in models
    assert len(models) == len(set(models))


def test_defaults_and_all():
    assert resolve_rank_models("").split(",") == cacheable_models()
    assert resolve_rank_models("all").split(",") == cacheable_models()
    assert resolve_rank_models("", load=True) == "avg_pool"      # --load keeps its default
    assert resolve_rank_models("twin,lrea") == "twin,lrea"
    # an explicit model in front of all keeps its place, once
    assert resolve_rank_models("lcn,all").split(",") == ["lcn"] + [
        m for m in cacheable_models() if m != "lcn"]


def test_unknown_model_is_one_usage_error():
    with pytest.raises(LifelongError, match=r"unknown model\(s\) \['twinn'\]"):
        resolve_rank_models("twin,twinn")
