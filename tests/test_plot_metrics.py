"""tools/plot_metrics.py: curves of several runs overlaid into a PNG; errors name what is missing."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import plot_metrics  # noqa: E402
from jaxlm.train import metrics as metrics_lib  # noqa: E402


def fake_run(path, scale: float):
    path.mkdir()
    lines = [{"step": s, "train/loss": scale / s} for s in range(10, 110, 10)]
    lines += [{"step": 50, "eval/loss": scale / 40, "eval/bleu": 3.0 * scale}, {"step": 100, "eval/loss": scale / 90}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_runs_are_overlaid_one_panel_per_key(tmp_path):
    runs = [fake_run(tmp_path / "full", 1.0), fake_run(tmp_path / "lora", 2.0)]
    curves = [metrics_lib.read_curves(r) for r in runs]
    assert curves[1]["train/loss"][20] == 0.1 and curves[0]["eval/loss"] == {50: 1 / 40, 100: 1 / 90}
    assert plot_metrics.default_keys(curves) == ["train/loss", "eval/loss", "eval/bleu"]
    output = tmp_path / "out" / "curves.png"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), *runs,
                             f"--output={output}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(output)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 20_000


def test_a_missing_key_or_run_is_named(tmp_path):
    run = fake_run(tmp_path / "full", 1.0)
    with pytest.raises(ValueError, match=r"no run logs \['eval/rouge'\]; the runs log \['eval/bleu', 'eval/loss'"):
        plot_metrics.plot([metrics_lib.read_curves(run)], ["full"], ["eval/rouge"], str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        metrics_lib.read_curves(str(tmp_path))
