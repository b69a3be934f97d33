"""A/B of the autograph change (docs/benchmarks.md, Training start-up): a tiny train() in a
fresh process with autograph on (the decorated methods' originals put back) or off.

    python scripts/ag_train.py twin on; python scripts/ag_train.py twin off
"""
import sys, time, tempfile, json
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tensorflow as tf
from tfmodels.model import LifelongCTRModel as M
if sys.argv[2] == "on":
    for a in ("compute_loss", "user_tower", "rank", "predict_ctr"):
        setattr(M, a, getattr(M, a).__wrapped__)
from tfmodels import train as T
from tfmodels.testing import write_tiny_dataset
d = tempfile.mkdtemp(); write_tiny_dataset(d)
cfg = T.TrainConfig(data=d, model=sys.argv[1], out_dir=tempfile.mkdtemp(), short_len=5, long_len=24,
                    emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4], batch_size=16, epochs=1,
                    steps_per_epoch=4, verbose=0)
t = time.time(); c = time.process_time()
s = T.train(cfg)
print(sys.argv[1], sys.argv[2], "train() wall %.1f s cpu %.1f s" % (time.time() - t, time.process_time() - c),
      "loss", s["history"]["total_loss"], "test", {k: s.get("test", {}).get(k) for k in ("auc", "logloss")})
