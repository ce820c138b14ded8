"""The same training on 1 device and on 8 simulated CPU devices under several meshes.

The 8-device runs happen in a subprocess: the device count is fixed when jax starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bert_jax import train

from test_train import REPO_ROOT, archive, tiny_config  # noqa: F401 (archive is a fixture)

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}]
    from bert_jax import train
    from test_train import tiny_config
    import pathlib
    archive, minilm, workdir = sys.argv[1:4]
    results = {{}}
    for shape in {meshes!r}:
      config = tiny_config(pathlib.Path(archive), pathlib.Path(minilm), **{overrides!r})
      config.mesh_shape = shape
      results[str(shape)] = train.train_and_evaluate(config, f"{{workdir}}/{{'x'.join(map(str, shape))}}")
    print("RESULTS " + json.dumps(results))
""")

# Dropout off, a vocab that divides over a tensor axis of 2, micro-batches to exercise accumulation.
OVERRIDES = {"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0,
             "model.vocab_size": 30528, "train.batch_size": 16, "train.grad_accum_steps": 2}


@pytest.mark.slow
def test_meshes_on_8_devices_match_one_device(tmp_path, archive, minilm_dir):
  single = train.train_and_evaluate(tiny_config(archive, minilm_dir, **OVERRIDES), str(tmp_path / "one"))
  script = SCRIPT.format(tests=str(REPO_ROOT / "tests"), meshes=MESHES, overrides=OVERRIDES)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script, str(archive), str(minilm_dir), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULTS "))[8:])
  for shape, result in results.items():
    # float32; summation order differs across shardings: agreement to 1e-5 relative.
    assert result["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-5), shape
    assert result["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5), shape
