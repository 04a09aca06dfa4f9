"""tools/inspect_checkpoint.py on a run trained on a 4-device mesh: every parameter with the
sharding the run's rules give, its bytes, per-device bytes and norm, and totals that add up."""

import json
import os
import subprocess
import sys

import flax
import numpy as np

from test_train import REPO, needs_shakespeare, tiny_config, train
from jaxlm.train import loop


@needs_shakespeare
def test_inspect_checkpoint_lists_every_parameter_with_its_sharding_bytes_and_norm(data_dir, tmp_path):
    config = tiny_config(data_dir, steps=5)
    config.mesh.update(dict(num_devices=4, data=1, fsdp=2, tensor=2))
    train(config, tmp_path / "run")
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "inspect_checkpoint.py"), str(tmp_path / "run"),
                             f"--json={out}"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    _, params, step = loop.restore_latest(str(tmp_path / "run"))
    flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
    rows = {r["path"]: r for r in report["rows"]}
    assert report["step"] == step == 5 and sorted(rows) == sorted(flat)
    for path, value in flat.items():
        assert rows[path]["shape"] == list(value.shape) and rows[path]["bytes"] == value.nbytes
        np.testing.assert_allclose(rows[path]["norm"], np.linalg.norm(value.ravel()), rtol=1e-5)
    wi = rows["decoder/layers/mlp/wi/kernel"]  # [layers, embed, mlp]: embed over fsdp, mlp over tensor
    assert wi["axes"] == ["layers", "embed", "mlp"] and wi["sharding"] == "('stage', 'fsdp', 'tensor')"
    assert wi["per_device_bytes"] == wi["bytes"] // 4
    params_json = json.loads((tmp_path / "run" / "params.json").read_text())
    assert report["totals"]["parameters"] == params_json["total"] == report["totals"]["trainable"]
    assert "total:" in result.stdout.splitlines()[-1]
