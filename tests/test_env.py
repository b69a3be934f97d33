"""The Keras-line guard."""
import os
import subprocess
import sys


def _run(code, env_value):
    env = dict(os.environ)
    if env_value is None:
        env.pop("TF_USE_LEGACY_KERAS", None)
    else:
        env["TF_USE_LEGACY_KERAS"] = env_value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_sets_legacy_keras():
    r = _run("import os, tfmodels; print(os.environ['TF_USE_LEGACY_KERAS'])", None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_explicit_zero_is_rejected_with_clear_message():
    r = _run("import tfmodels", "0")
    assert r.returncode != 0
    assert "TF_USE_LEGACY_KERAS" in r.stderr and "Keras 2" in r.stderr


def test_training_commands_choose_onednn_and_tf_keras_is_keras2():
    """(One process, as both need a fresh TensorFlow import.) tf.keras is Keras 2 after
    importing tfmodels. `lifelong train` / `compare` / `bench accuracy` set TF_ENABLE_ONEDNN_OPTS=1 before
    TensorFlow loads (TensorFlow reads it once, at import) and TensorFlow then reports
    oneDNN on; a caller's own value wins; serving commands and a process that already
    loaded TensorFlow are left alone. One process: `--help` does not load TensorFlow."""
    code = """
import os, sys
from lifelong import cli
def value(argv, preset=None):
    os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if preset is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = preset
    try:
        cli.main(argv + ["--help"])
    except SystemExit:
        pass
    assert "tensorflow" not in sys.modules
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS")
print("VALUES", value(["train"]), value(["compare"]), value(["bench", "accuracy"]),
      value(["train"], "0"), value(["serve"]), value(["bench", "serving"]))
os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
from tfmodels._env import prefer_onednn_for_training as prefer
first = prefer()
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port as port
os.environ.pop("TF_ENABLE_ONEDNN_OPTS")
print("ONEDNN", first, port.IsMklEnabled(), prefer())
print("KERAS", tf.keras.layers.Layer.__module__.split(".")[0])
"""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith(("VALUES", "ONEDNN", "KERAS"))]
    assert lines == ["VALUES 1 1 1 0 None None", "ONEDNN True True False", "KERAS tf_keras"]
