"""Training: best-epoch selection and early stopping, straight through and across --resume.

The validation AUC of each epoch is scripted (``LifelongCTRModel.evaluate`` is wrapped
so that ``fit``'s validation returns a chosen ``auc``), so which epoch is best is known
in advance; the model's weights at the end of every epoch are copied when ``fit``
validates it, and ``final/`` must hold exactly the best epoch's copy.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfmodels import train as T
from tfmodels.model import LifelongCTRModel

pytestmark = pytest.mark.filterwarnings(
    "ignore:Even though the `tf.config.experimental_run_functions_eagerly`:UserWarning")
STEPS = 3   # steps per epoch; the epoch being validated = optimizer.iterations // STEPS
_EVALUATE = LifelongCTRModel.evaluate   # the unpatched one


@pytest.fixture(autouse=True)
def eager_functions():
    """Tracing the train/test functions of each new model dominates these tiny runs;
    the callbacks under test behave the same either way."""
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


class Interrupted(Exception):
    """Stands for the process being killed."""


class ScriptedValidation:
    """Replaces the validation AUC of epoch N (1-based) by ``aucs[N - 1]`` and keeps a
    copy of the weights each epoch ended with; raises :class:`Interrupted` while
    validating epoch ``crash_at`` (after its training steps, before its checkpoint)."""

    def __init__(self, monkeypatch, aucs, crash_at=None):
        self.aucs, self.crash_at = list(aucs), crash_at
        self.weights = {}      # epoch -> model.get_weights() at the end of that epoch
        self.validated = []    # epochs validated, in order (across train() calls)

        def evaluate(model, *args, **kwargs):
            epoch = int(model.optimizer.iterations.numpy()) // STEPS
            self.validated.append(epoch)
            if epoch == self.crash_at:
                self.crash_at = None           # only once: the resumed run goes on
                raise Interrupted(f"killed while validating epoch {epoch}")
            self.weights[epoch] = [w.copy() for w in model.get_weights()]
            out = _EVALUATE(model, *args, **kwargs)
            assert kwargs.get("return_dict"), "fit is expected to ask for a dict"
            out["auc"] = self.aucs[epoch - 1]
            return out

        monkeypatch.setattr(LifelongCTRModel, "evaluate", evaluate)


def _config(data, out_dir, epochs, patience=2):
    return T.TrainConfig(data=data, model="din", out_dir=out_dir, short_len=5, long_len=24,
                         emb_dim=4, mlp_hidden=[8], din_hidden=[8, 4], batch_size=32,
                         epochs=epochs, steps_per_epoch=STEPS, learning_rate=3e-2,
                         early_stopping_patience=patience, shuffle_buffer=64, verbose=0)


def _final_weights(run_dir):
    """The weights in final/, read the way `lifelong evaluate` reads them."""
    from tfmodels import data as D
    from tfmodels import schema as S
    cfg, model = T.load_run(run_dir)
    model(next(iter(D.make_dataset(S.split_pattern(cfg.data, "test"), cfg.short_len,
                                   cfg.long_len, 8))))
    return model.get_weights()


def _assert_same(actual, expected, what):
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e, err_msg=what)


def _max_gap(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


AUCS = [0.60, 0.70, 0.65, 0.62]   # best: epoch 2; patience 2 stops after epoch 4


@pytest.mark.parametrize("run", ["straight", "epochs3_then_resume", "killed_in_epoch4"])
def test_keeps_best_epoch_weights(run, tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    script = ScriptedValidation(monkeypatch, AUCS,
                                crash_at=4 if run == "killed_in_epoch4" else None)
    if run == "straight":      # 6 epochs allowed: patience 2 stops it after epoch 4
        # a fresh start (no --resume) in a used directory forgets its old epoch log
        os.makedirs(out)
        with open(os.path.join(out, "epochs.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 1, "logs": {"val_auc": 0.99}, "wall_s": 1e6,
                                "train_examples_per_s": 1.0}) + "\n")
        T.train(_config(tiny_data, out, epochs=6))
    elif run == "epochs3_then_resume":
        T.train(_config(tiny_data, out, epochs=3))
        T.train(_config(tiny_data, out, epochs=4), resume=True)
    else:
        with pytest.raises(Interrupted):
            T.train(_config(tiny_data, out, epochs=4))
        assert not os.path.exists(os.path.join(out, "run.json"))
        # as if the kill had come between epoch 4's log line and its checkpoint: the
        # resumed run must drop that line (the checkpoint says 3 epochs) and log its own
        with open(os.path.join(out, "epochs.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": 4, "logs": {"val_auc": 0.99}, "wall_s": 1e6,
                                "train_examples_per_s": 1.0}) + "\n" + '{"epoch": 5, "lo')
        T.train(_config(tiny_data, out, epochs=4), resume=True)
    assert script.validated == ([1, 2, 3, 4] if run != "killed_in_epoch4" else [1, 2, 3, 4, 4])
    # the test is only meaningful if the later epochs really moved the weights
    assert _max_gap(script.weights[4], script.weights[2]) > 1e-3

    _assert_same(_final_weights(out), script.weights[2], f"{run}: final/ is not epoch 2")
    summary = json.load(open(os.path.join(out, "run.json")))
    assert summary["best_epoch"] == 2 and summary["final_epoch"] == 2
    assert summary["best_val_auc"] == pytest.approx(0.70)
    assert summary["stopped_epoch"] == 4
    if run == "straight":
        assert summary["early_stopped"] is True
    # history, wall time and speed cover the whole run, across the resume (epochs.jsonl)
    assert summary["history_epochs"] == [1, 2, 3, 4]
    assert summary["history"]["val_auc"] == pytest.approx(AUCS)
    assert len(summary["train_examples_per_s"]) == 4
    assert 0 < summary["train_wall_s"] < 1e5
    if run != "straight":
        assert summary["resumed_at_epoch"] == 3
        assert summary["train_wall_s"] > summary["train_wall_s_this_call"]
    # superseded best-epoch files are gone; the best one stays for a later --resume
    best_files = sorted(os.listdir(os.path.join(out, "ckpt", "best")))
    assert best_files and all(f.startswith("epoch-2.") for f in best_files), best_files


def test_patience_counts_across_resume(tiny_data, tmp_path, monkeypatch):
    """Epochs 3 and 4 do not improve on epoch 2: with patience 2 the run stops after
    epoch 4 also when it was interrupted after epoch 3 (the uninterrupted run's stop is
    test_keeps_best_epoch_weights[straight]), and never sees epoch 5's (better) AUC;
    resuming the stopped run trains nothing more."""
    aucs = [0.60, 0.70, 0.65, 0.62, 0.80, 0.90]
    resumed = str(tmp_path / "resumed")
    script = ScriptedValidation(monkeypatch, aucs)
    T.train(_config(tiny_data, resumed, epochs=3))
    s2 = T.train(_config(tiny_data, resumed, epochs=6), resume=True)
    assert script.validated == [1, 2, 3, 4]          # epoch 4 only after the resume
    assert s2["history"]["val_auc"] == pytest.approx(aucs[:4])   # epochs 1-3 too
    _assert_same(_final_weights(resumed), script.weights[2], "final/ is not epoch 2")
    assert (s2["stopped_epoch"], s2["early_stopped"], s2["best_epoch"]) == (4, True, 2)

    # the stopped run, resumed again: nothing is trained, final/ still epoch 2
    s3 = T.train(_config(tiny_data, resumed, epochs=6), resume=True)
    assert script.validated == [1, 2, 3, 4]
    # nothing trained in this call, yet the run's history, wall and speed are reported
    assert s3["history"] == s2["history"] and s3["history_epochs"] == [1, 2, 3, 4]
    assert s3["train_wall_s_this_call"] < s3["train_wall_s"] == pytest.approx(
        s2["train_wall_s"] - s2["train_wall_s_this_call"] + sum(
            line["wall_s"] for line in T.read_epoch_log(
                os.path.join(resumed, "epochs.jsonl")) if line["epoch"] == 4)
        + s3["train_wall_s_this_call"])
    assert s3["train_examples_per_s"] == s2["train_examples_per_s"]
    assert (s3["stopped_epoch"], s3["best_epoch"]) == (4, 2)
    _assert_same(_final_weights(resumed), script.weights[2], "re-resumed final/ changed")

    # a larger patience lets the same run go on from where it stopped
    s4 = T.train(dataclasses.replace(_config(tiny_data, resumed, epochs=6),
                                     early_stopping_patience=3), resume=True)
    assert script.validated == [1, 2, 3, 4, 5, 6]
    assert (s4["stopped_epoch"], s4["best_epoch"], s4["early_stopped"]) == (6, 6, False)
    assert s4["history"]["val_auc"] == pytest.approx(aucs) and len(
        s4["train_examples_per_s"]) == 6
    _assert_same(_final_weights(resumed), script.weights[6], "final/ is not epoch 6")


def test_read_epoch_log_keeps_one_line_per_epoch_up_to_the_checkpoint(tmp_path):
    path = str(tmp_path / "epochs.jsonl")
    lines = [{"epoch": 1, "logs": {"auc": 0.5, "val_auc": 0.55}, "wall_s": 2.0},
             {"epoch": 2, "logs": {"auc": 0.6}, "wall_s": 3.0},
             {"epoch": 2, "logs": {"auc": 0.7, "val_auc": 0.65}, "wall_s": 4.0},
             {"epoch": 3, "logs": {"auc": 0.8, "val_auc": 0.75}, "wall_s": 5.0}]
    with open(path, "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 4, "lo')
    got = T.read_epoch_log(path, upto=2)
    assert [g["wall_s"] for g in got] == [2.0, 4.0]   # the later line of epoch 2 wins
    assert T.history_from_epoch_log(got) == {"auc": [0.5, 0.7], "val_auc": [0.55, 0.65]}
    assert [g["epoch"] for g in T.read_epoch_log(path)] == [1, 2, 3]
    assert T.read_epoch_log(str(tmp_path / "absent.jsonl")) == []
