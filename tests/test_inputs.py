"""Calibration and evaluation on input files (--calib-inputs, eval --inputs): a vision
transformer with no text at all, and a text model fed token ids from a file."""

import json

import numpy as np
import onnx
import pytest

from clirun import lrc, one_line_error as _one_line_error

from lrc.errors import LrcError
from lrc.runtime.feeds import InputSpec, describe_batch, graph_input_specs, load_inputs

torch = pytest.importorskip("torch")

class _Block(torch.nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))
        self.out = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        y = self.n1(x)
        q, k, v = (p(y).view(b, n, h, d // h).transpose(1, 2)
                   for p in (self.query, self.key, self.value))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.n2(x))))


class _ViT(torch.nn.Module):
    """A ViT-S/16 in miniature: conv patch embedding, 2 blocks, mean pool, class head."""

    def __init__(self, d=64, classes=10):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, d, 4, 4)
        self.pos = torch.nn.Parameter(torch.randn(1, 16, d) * 0.02)
        self.blocks = torch.nn.ModuleList([_Block(d) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(d)
        self.classifier = torch.nn.Linear(d, classes)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.classifier(self.norm(x).mean(1))


def _images(n, seed):
    """Images with structure (smooth 4x4 blocks plus noise): activations far from isotropic,
    which is what calibration is for."""
    r = np.random.default_rng(seed)
    base = np.repeat(np.repeat(r.standard_normal((n, 3, 4, 4)), 4, 2), 4, 3)
    return (base + 0.1 * r.standard_normal((n, 3, 16, 16))).astype(np.float32)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    with torch.no_grad():
        torch.onnx.export(_ViT().eval(), (torch.randn(2, 3, 16, 16),), str(root / "vit.onnx"),
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    for folder, seeds in (("calib", range(8)), ("test", range(100, 104))):
        (root / folder).mkdir()
        for s in seeds:
            np.savez(root / folder / f"b{s}.npz", pixel_values=_images(8, s))
    return root


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_vision_model_calibrates_from_files_and_eval_reports_agreement(vit, tmp_path):
    calibrated, plain = tmp_path / "w.onnx", tmp_path / "p.onnx"
    r = lrc("compress", vit / "vit.onnx", "-o", calibrated, "--ratio", "0.5",
            "--calib-inputs", vit / "calib")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "w.onnx.lrc.json").read_text())
    text = json.dumps(info)
    assert "svd-llm" in text and "--calib-inputs" in text  # auto picked the whitened method
    r = lrc("compress", vit / "vit.onnx", "-o", plain, "--ratio", "0.5", "--method", "svd")
    assert r.returncode == 0, r.stderr
    # held-out images (not the calibration files): agreement of both with the original
    r = lrc("eval", vit / "vit.onnx", calibrated, plain, "--inputs", vit / "test", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "agreement" and res["inputs"] == "4 batches: pixel_values 8x3x16x16"
    w, p = (x["logits"] for x in res["results"])
    print(f"calibrated: rel {w['rel_error']:.3f} top-1 {w['top1_agreement']:.3f}; "
          f"plain: rel {p['rel_error']:.3f} top-1 {p['top1_agreement']:.3f}")
    assert w["rel_error"] < 0.5 * p["rel_error"]
    assert w["cosine"] > p["cosine"] and w["top1_agreement"] >= p["top1_agreement"]
    assert 0 <= w["top1_agreement"] <= 1 and w["values"] == 4 * 8 * 10
    # the table names the shapes as they are
    r = lrc("eval", vit / "vit.onnx", calibrated, "--inputs", vit / "test")
    assert r.returncode == 0 and "pixel_values 8x3x16x16" in r.stdout and "top-1" in r.stdout


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_quantisation_correction_and_update_calibrate_from_files(vit, tmp_path):
    q = tmp_path / "q.onnx"
    r = lrc("compress", vit / "vit.onnx", "-o", q, "--quantize", "int4", "--block-size", "16",
            "--correct-rank", "8", "--calib-inputs", vit / "calib")
    assert r.returncode == 0, r.stderr
    u = tmp_path / "u.onnx"
    r = lrc("compress", vit / "vit.onnx", "-o", u, "--ratio", "0.5", "--method", "svd-llm",
            "--update", "--calib-inputs", vit / "calib" / "b0.npz",
            "--calib-inputs", vit / "calib" / "b1.npz")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "u.onnx.lrc.json").read_text())["method"] == "svd-llm+update"
    r = lrc("eval", vit / "vit.onnx", q, u, "--inputs", vit / "test", "--json")
    assert r.returncode == 0, r.stderr
    qres, ures = (x["logits"] for x in json.loads(r.stdout)["results"])
    assert qres["cosine"] > 0.99 and ures["cosine"] > 0.9


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_calib_inputs_refusals(vit, tmp_path):
    line = _one_line_error(lrc("compress", vit / "vit.onnx", "-o", tmp_path / "x.onnx",
                               "--ratio", "0.5", "--calib-inputs", vit / "calib",
                               "--tokenizer", vit))
    assert "--calib-inputs" in line
    np.savez(tmp_path / "bad.npz", pixel_values=np.zeros((2, 3, 8, 8), np.float32))
    line = _one_line_error(lrc("compress", vit / "vit.onnx", "-o", tmp_path / "x.onnx",
                               "--ratio", "0.5", "--calib-inputs", tmp_path / "bad.npz"))
    assert "axis 2" in line and not (tmp_path / "x.onnx").exists()
    line = _one_line_error(lrc("eval", vit / "vit.onnx", vit / "vit.onnx", "--inputs",
                               tmp_path / "nothing-here"))
    assert "no such input file" in line


def test_load_inputs_checks_names_dtypes_shapes(tmp_path):
    specs = [InputSpec("pixel_values", np.dtype(np.float32), ["batch", 3, 4, 4])]
    good = tmp_path / "good.npz"
    np.savez(good, pixel_values=np.zeros((2, 3, 4, 4), np.float32))
    [b] = load_inputs([good], specs)
    assert describe_batch(b) == "pixel_values 2x3x4x4"
    cases = {
        "name": ({"pixels": np.zeros((2, 3, 4, 4), np.float32)}, "not an input"),
        "dtype": ({"pixel_values": np.zeros((2, 3, 4, 4), np.float64)}, "float64"),
        "rank": ({"pixel_values": np.zeros((3, 4, 4), np.float32)}, "shape 3x4x4"),
        "dim": ({"pixel_values": np.zeros((2, 1, 4, 4), np.float32)}, "axis 1"),
        "empty": ({"pixel_values": np.zeros((0, 3, 4, 4), np.float32)}, "empty"),
        "pickle": ({"pixel_values": np.array([{"a": 1}], dtype=object)}, "will not read"),
    }
    for name, (arrays, want) in cases.items():
        f = tmp_path / f"{name}.npz"
        np.savez(f, **arrays)
        with pytest.raises(LrcError, match=want):
            load_inputs([f], specs)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LrcError, match="not a readable"):
        load_inputs([tmp_path / "junk.npz"], specs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrcError, match="no .npz"):
        load_inputs([tmp_path / "empty"], specs)


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_token_ids_file_calibrates_a_text_model(tmp_path):
    from fixtures_export import save_tiny
    from lrc.exporters import export

    save_tiny("llama", tmp_path / "hf", seed=3, tokenizer=False)
    export(tmp_path / "hf", tmp_path / "onnx", exporter="optimum")
    model = tmp_path / "onnx" / "model.onnx"
    specs = graph_input_specs(onnx.load(model, load_external_data=False))
    assert any(s.name == "input_ids" for s in specs) and len(specs) > 1
    rng = np.random.default_rng(0)
    for i in range(3):  # input_ids alone: the feed builder adds mask, positions, empty cache
        np.savez(tmp_path / f"ids{i}.npz", input_ids=rng.integers(0, 100, (1, 16)).astype(np.int64))
    out = tmp_path / "c.onnx"
    r = lrc("compress", model, "-o", out, "--ratio", "0.5",
            *(a for i in range(3) for a in ("--calib-inputs", tmp_path / f"ids{i}.npz")))
    assert r.returncode == 0, r.stderr
    # the default recipe: svd-llm with the joint update, run on the files' token ids
    assert json.loads((tmp_path / "c.onnx.lrc.json").read_text())["method"] == "svd-llm+update"
    r = lrc("eval", model, out, "--inputs", tmp_path / "ids0.npz", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert res["logits"]["top1_agreement"] is not None and res["logits"]["cosine"] > 0.5
