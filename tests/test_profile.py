"""`recsys profile` end to end on a tiny real BERT: counted, measured and predicted costs; bad shapes."""
import json

import pytest

from recsys.cli import main
from recsys.efficiency import predictor
from recsys.serving import latency_tables


@pytest.fixture(autouse=True)
def small_grids(monkeypatch, tmp_path):
    monkeypatch.setattr(predictor, "CACHE_DIR", tmp_path / "cache")
    orig = latency_tables.build_tables

    def fast(base, **kw):
        kw.update(items=(1000, 10000), dims=(32, 64), seq=(16, 32, 64), min_seconds=0.01)
        return orig(base, **kw)
    monkeypatch.setattr(latency_tables, "build_tables", fast)


def test_profile_prints_costs_and_writes_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--items", "5000", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured user tower" in printed and "predicted online" in printed
    data = json.loads(out.read_text())
    assert data["params"] > 0 and data["measured_user_ms"]["median_ms"] > 0 and data["predicted_user_ms"] > 0


def test_profile_at_int8_serves_real_int8_with_its_own_calibration(tiny_model, tmp_path, capsys):
    fp32, int8 = tmp_path / "fp32.json", tmp_path / "int8.json"
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--output", str(fp32)]) == 0
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--precision", "int8",
                 "--int8-backend", "onnxruntime", "--output", str(int8)]) == 0
    printed = capsys.readouterr().out
    assert "int8 (served by ort-int8)" in printed
    a, b = json.loads(fp32.read_text()), json.loads(int8.read_text())
    assert b["precision"] == "int8" and b["route"] == "ort-int8" and b["shape"]["dtype"] == "int8"
    assert b["weight_bytes"] < a["weight_bytes"] and b["measured_user_ms"]["median_ms"] > 0
    assert b["predicted_user_ms"] > 0 and b["predicted_user_ms"] != a["predicted_user_ms"]
    # the fp32 operator tables, and the constants fitted on the int8 route beside them
    assert len(list((tmp_path / "cache").glob("tables-*.json"))) == 2
    assert main(["profile", "--encoder", tiny_model, "--precision", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_validate_reports_errors_over_random_shapes(tiny_model, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32", "--validate", "--shapes", "6",
                 "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n_shapes"] == 6 and len(data["shapes"]) == 6 and data["mape"] >= 0
    assert data["measured_ms_max"] >= data["measured_ms_min"] > 0


def _shape_json(**changes) -> str:
    """A valid shape of the tiny test BERT (2 layers, hidden 32, 4 heads of 8, FFN 64), with changes."""
    layer = {"heads": [0, 1, 2, 3], "ffn": 64}
    d = {"layers": [layer, dict(layer)], "hidden": 32, "head_dim": 8, "n_heads_dense": 4, "ffn_dense": 64,
         "vocab_size": 30522, "max_positions": 512, "type_vocab_size": 2}
    for k, v in changes.items():
        if k.startswith("layer0_"):
            d["layers"][0][k[len("layer0_"):]] = v
        else:
            d[k] = v
    return json.dumps(d)


@pytest.mark.parametrize("content,needle", [
    ('{"layers": [], "hidden": 32, "bogus": 1}', "unknown key 'bogus'"),
    ("{not json", "invalid JSON"),
    (_shape_json(layer0_heads=[0, 7]), "shape.layers[0].heads: head index 7 out of range [0, 4)"),
    (_shape_json(layer0_heads=[1, 1]), "head index 1 listed twice"),
    (_shape_json(layer0_ffn=-3), "ffn: must be >= 0, got -3"),
    (_shape_json(layer0_ffn=100), "ffn: 100 exceeds the dense FFN width 64"),
    (_shape_json(hidden=-32), "shape.hidden: must be >= 1, got -32"),
    (_shape_json(output_dim=0), "shape.output_dim: must be >= 1"),
    (_shape_json(dtype="float16"), "unknown dtype 'float16'"),
    (_shape_json(layer0_experts=4), "unknown key 'experts'"),
    (_shape_json(hidden=64), "shape.hidden is 64 but the checkpoint has 32"),
])
def test_bad_shape_file_is_one_line(tiny_model, tmp_path, capsys, content, needle):
    shape = tmp_path / "shape.json"
    shape.write_text(content)
    assert main(["profile", "--encoder", tiny_model, "--shape", str(shape)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "shape.json" in err[0]


def test_unwritable_cache_folder_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(predictor, "CACHE_DIR", blocker / "latency")
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency cache folder" in err[0] and "RECSYS_CACHE" in err[0]


def test_corrupt_cache_file_is_rebuilt(tiny_model, tmp_path, capsys):
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32"]) == 0
    (cached,) = (tmp_path / "cache").glob("tables-*.json")
    cached.write_text("{truncated")
    assert main(["profile", "--encoder", tiny_model, "--seq-len", "32"]) == 0
    assert json.loads(cached.read_text())["attn_scale"] > 0
