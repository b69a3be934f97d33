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


def test_tf_keras_is_keras2_after_import():
    r = _run("import tfmodels, tensorflow as tf; print(tf.keras.layers.Layer.__module__)", None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("tf_keras")
