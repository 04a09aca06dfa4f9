"""tools/compress_report.py on a tiny SST-2 run: rows, figures and files (methods that need no
training; the training ones run `python -m jaxlm.main` and are exercised by their own tests)."""

import json
import os
import sys

import pytest

from jaxlm.train import loop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import compress_report  # noqa: E402 (tools/ is not a package)


@pytest.mark.slow  # a tiny run, three exports and their evaluations (~35 s)
def test_report_measures_each_method_against_the_float_baseline(tmp_path, tiny_finetune, monkeypatch, capsys):
    baseline = str(tmp_path / "base")
    config = tiny_finetune()
    config.model.update(dict(emb_dim=128, num_heads=2, mlp_dim=256))
    loop.train_and_evaluate(config, baseline)
    out = str(tmp_path / "report")
    monkeypatch.setattr(sys, "argv", ["compress_report.py", f"--baseline={baseline}", f"--output={out}",
                                      "--methods=int8,int4", "--rounds=1", "--calls=1"])
    compress_report.main()
    rows = {r["method"]: r for r in json.load(open(os.path.join(out, "report.json")))}
    assert list(rows) == ["float", "int8", "int4"]  # the reference row comes first
    assert rows["int8"]["params"] == rows["float"]["params"]  # codes, not scales, are counted
    assert rows["int8"]["bytes"] <= 0.3 * rows["float"]["bytes"]
    assert rows["int4"]["bytes"] <= 0.17 * rows["float"]["bytes"]
    metrics = json.load(open(os.path.join(out, "float", "served", "eval", "validation", "metrics.json")))
    assert rows["float"]["metric"] == pytest.approx(metrics["accuracy"])
    assert all(r["ms"] > 0 for r in rows.values())
    assert os.path.getsize(os.path.join(out, "report.png")) > 10_000
    table = open(os.path.join(out, "report.md")).read()
    assert "| int4 |" in table and "compress_report.py" in table and "| int4 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        compress_report.compress(type("A", (), dict(output=out))(), "int3")
