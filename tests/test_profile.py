"""`recsys profile` end to end on a tiny real BERT: counted, measured and predicted costs; bad shapes."""
import json

import pytest

from recsys.cli import main
from recsys.efficiency import predictor


@pytest.fixture(autouse=True)
def small_grids(monkeypatch, tmp_path):
    monkeypatch.setattr(predictor, "CACHE_DIR", tmp_path / "cache")
    orig = predictor.build_tables

    def fast(base, **kw):
        kw.update(items=(1000, 10000), dims=(32, 64), seq=(16, 32, 64), min_seconds=0.01)
        return orig(base, **kw)
    monkeypatch.setattr(predictor, "build_tables", fast)


def test_profile_prints_costs_and_writes_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--items", "5000", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured user tower" in printed and "predicted online" in printed
    data = json.loads(out.read_text())
    assert data["params"] > 0 and data["measured_user_ms"]["median_ms"] > 0 and data["predicted_user_ms"] > 0


def test_validate_reports_errors_over_random_shapes(tiny_model, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--validate", "--shapes", "6",
                 "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n_shapes"] == 6 and len(data["shapes"]) == 6 and data["mape"] >= 0
    assert data["measured_ms_max"] >= data["measured_ms_min"] > 0


@pytest.mark.parametrize("content,needle", [
    ('{"layers": [], "hidden": 32, "bogus": 1}', "unknown key 'bogus'"),
    ("{not json", "invalid JSON"),
])
def test_bad_shape_file_is_one_line(tiny_model, tmp_path, capsys, content, needle):
    shape = tmp_path / "shape.json"
    shape.write_text(content)
    assert main(["profile", "--encoder", tiny_model, "--shape", str(shape)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "shape.json" in err[0]
