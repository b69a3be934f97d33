"""TF Serving warmup records (issue 20 item 3): the export writes them in TF Serving's
format, the local server replays them before the version is AVAILABLE, a broken
record fails the load. One tiny ``din_l`` export with ``--jit_rank``."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from serving import export as E
from serving import protos
from serving import warmup as W
from serving.model_manager import ModelManager, State
from serving.servable import SavedModelServable
from tfmodels import schema as S
from tfmodels.model import build_model
from tfmodels.testing import write_tiny_dataset

MAX_N = 20                       # buckets 8, 16, 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    data = write_tiny_dataset(str(tmp_path_factory.mktemp("warm_data")), num_users=6, seed=2)
    schema = S.FeatureSchema.from_data_dir(data, 5, 24)
    tf.keras.utils.set_random_seed(0)
    model = build_model(schema, "din_l", emb_dim=4, mlp_hidden=(8,), din_hidden=(8, 4))
    base = str(tmp_path_factory.mktemp("warm_models"))
    out = E.export_model(model, base, "din_l", 1, jit_rank=True, warmup_max_candidates=MAX_N)
    return base, out


def test_bucket_sizes():
    assert W.bucket_sizes(1) == [8] and W.bucket_sizes(8) == [8]
    assert W.bucket_sizes(9) == [8, 16] and W.bucket_sizes(MAX_N) == [8, 16, 32]
    sizes = W.bucket_sizes(10_000)
    assert sizes[-1] == 16384 and len(sizes) == 12
    with pytest.raises(W.WarmupError, match="max_candidates must be >= 1"):
        W.bucket_sizes(0)


def test_export_writes_tf_serving_warmup_records(exported):
    base, out = exported
    path = os.path.join(out["path"], "assets.extra", "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(r)
            for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]   # plain TFRecord
    assert [x.WhichOneof("log_type") for x in logs] == ["predict_log"] * 5
    reqs = [x.predict_log.request for x in logs]
    assert [r.model_spec.signature_name for r in reqs] == (
        ["rank"] * 3 + ["user_tower", "serving_default"])
    assert all(r.model_spec.name == "din_l" for r in reqs)
    meta = E.read_export_meta(out["path"])
    assert meta["warmup"] == {"records": 5, "rank_candidates": [8, 16, 32]}
    sig_inputs = {k: set(v["inputs"]) for k, v in meta["signatures"].items()}
    for r in reqs:
        assert set(r.inputs) == sig_inputs[r.model_spec.signature_name]
    ranks = [{k: protos.to_ndarray(t) for k, t in r.inputs.items()} for r in reqs[:3]]
    assert [len(x["target_item_id"]) for x in ranks] == [8, 16, 32]     # every bucket
    # the cache is the export's own user_tower output for the record it also sends
    servable = SavedModelServable("din_l", 1, out["path"])
    record = protos.to_ndarray(reqs[3].inputs["records"])
    tower = servable.run("user_tower", {"records": record})
    for k in ("keys", "mask", "short_item_id", "short_cate_id"):
        np.testing.assert_array_equal(ranks[0][k], tower[k])
    assert np.abs(ranks[0]["keys"]).max() > 0 and ranks[0]["mask"].sum() == 24   # full history
    servable.close()


def test_server_replays_records_before_available(exported):
    base, _ = exported
    seen = []
    holder = {}

    class Counting(SavedModelServable):
        def run(self, signature, inputs):
            mgr = holder["manager"]
            state = mgr.status("din_l")[self.version][0]
            seen.append((signature, len(inputs.get("target_item_id", [])), state,
                         "din_l" in mgr.model_names()))
            return super().run(signature, inputs)

    mgr = ModelManager(base, poll_interval_s=0, servable_factory=Counting)
    holder["manager"] = mgr
    mgr.refresh()
    assert [(s, n) for s, n, _, _ in seen] == [("rank", 8), ("rank", 16), ("rank", 32),
                                              ("user_tower", 0), ("serving_default", 1)]
    assert all(state == State.LOADING and not served for _, _, state, served in seen)
    assert mgr.status("din_l")[1][0] == State.AVAILABLE
    assert mgr.get("din_l").warmup_records == 5


def test_broken_warmup_record_fails_the_load(exported, tmp_path):
    base, out = exported
    bad_base = tmp_path / "models"
    shutil.copytree(os.path.join(base, "din_l", "1"), bad_base / "din_l" / "1")
    reqs = W.read_warmup_requests(str(bad_base / "din_l" / "1"))
    del reqs[1].inputs["target_cate_id"]
    W.write_warmup_file(str(bad_base / "din_l" / "1"), reqs)
    mgr = ModelManager(str(bad_base), poll_interval_s=0)
    mgr.refresh()
    state, msg = mgr.status("din_l")[1]
    assert state == State.END
    assert msg.startswith("load failed: warmup record 1 (rank) failed"), msg
    with pytest.raises(Exception, match="has no loaded version"):
        mgr.get("din_l")
