"""Tests of lrc.report: a self-contained HTML file with embedded PNG plots and tables."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from lrc.present import report as R


def fake_bench() -> dict:
    runs = []
    for name, p50, sp in (("dense", 10.0, 1.0), ("lowrank", 8.0, 1.25)):
        runs.append({"model": name, "ep": "cpu", "phase": "encoder", "batch": 1, "seq": 128,
                     "decode_tokens": None, "n": 30, "p50_ms": p50, "p90_ms": p50 * 1.1,
                     "p99_ms": p50 * 1.2, "mean_ms": p50 * 1.05, "std_ms": 0.3, "min_ms": p50 * 0.9,
                     "speedup": sp, "tokens_per_s": None})
    return {
        "schema": "lrc.bench/1",
        "machine": {"cpu": "Test CPU", "logical_cores": 2, "physical_cores": 2, "onnxruntime": "1.x",
                    "available_providers": ["CPUExecutionProvider"], "platform": "linux"},
        "settings": {"eps": ["cpu"], "threads": None, "threads_note": "ORT default", "warmup": 3, "runs": 30,
                     "memory_method": "subprocess"},
        "models": [
            {"name": "dense", "kind": "encoder", "baseline": None, "size_bytes": 90_000_000,
             "weight_matmul_params": 1000, "flop_ratio": None, "amdahl_bound": None,
             "sessions": {"cpu": {"load_s": 0.1, "rss_after_first_run_mb": 100.0, "peak_rss_mb": 150.0}}},
            {"name": "lowrank", "kind": "encoder", "baseline": None, "size_bytes": 70_000_000,
             "weight_matmul_params": 600, "flop_ratio": 0.6, "amdahl_bound": {"encoder": 1.39},
             "sessions": {"cpu": {"load_s": 0.1, "rss_after_first_run_mb": 80.0, "peak_rss_mb": 120.0}}},
        ],
        "runs": runs,
        "amdahl": {"model": "dense", "ep": "cpu", "batch": 1, "seq": 128, "matmul_fraction": {"encoder": 0.7},
                   "note": "test"},
        "notes": ["a <note> to escape"],
    }


def fake_summary() -> dict:
    rng = np.random.default_rng(0)
    rewritten, nodes = [], []
    for block in range(4):
        for role, shape in (("attn_q", [64, 64]), ("mlp_up", [64, 256]), ("mlp_down", [256, 64])):
            sv = sorted(np.abs(rng.standard_normal(min(shape))) * np.exp(-np.arange(min(shape)) / 20), reverse=True)
            name = f"/layers.{block}/{role}/MatMul"
            nodes.append({"name": name, "role": role, "block": block, "shape": shape,
                          "spectrum": [float(x) for x in sv]})
            rewritten.append({"name": name, "role": role, "block": block, "rank": 16 + 4 * block, "shape": shape})
    return {"model": "tiny", "rewritten": rewritten, "nodes": nodes,
            "totals": {"params_before": 100000, "params_after": 70000}}


def fake_variants() -> dict:
    return {"title": "tiny", "metric": "perplexity", "higher_is_better": False,
            "variants": [{"name": "dense", "speedup": 1.0, "quality": 32.0},
                         {"name": "int8", "speedup": 1.8, "quality": 52.0},
                         {"name": "lr 0.8", "speedup": 1.1, "quality": 87.0},   # dominated by int8
                         {"name": "lr 0.5", "speedup": 2.0, "quality": 700.0}]}


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_full_report(tmp_path):
    out = R.write_report([fake_bench(), fake_variants()], tmp_path / "r" / "report.html", summaries=[fake_summary()])
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert '<img alt="' in text and 'src="data:image/png;base64,' in text
    pngs = _pngs(text)
    # speedup bars, speed-vs-quality, spectra, ranks
    assert len(pngs) == 4
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # tables
    assert "<table" in text and "p50 ms" in text and "lowrank" in text and "1.25" in text
    assert "Pareto" in text and "Singular-value spectra" in text and "rank chosen" not in text  # title is in PNG
    assert "&lt;note&gt;" in text  # escaped
    # self-contained: nothing fetched from the network
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_pareto_front():
    pts = [(1.0, 32.0), (1.8, 52.0), (1.1, 87.0), (2.0, 700.0)]
    assert R.pareto_front(pts, higher_is_better=False) == [0, 1, 3]
    assert R.pareto_front([(1.0, 0.6), (1.2, 0.65), (1.1, 0.5)], higher_is_better=True) == [1]


def test_missing_sections_are_omitted(tmp_path):
    text = R.write_report([], tmp_path / "empty.html").read_text()
    assert "No data" in text and "data:image/png" not in text
    # a bench with no runs, a summary without spectra: tables only, no plots
    b = fake_bench()
    b["runs"] = []
    s = fake_summary()
    for n in s["nodes"]:
        del n["spectrum"]
    text = R.write_report([b, {"variants": []}], tmp_path / "partial.html", summaries=[s, {}]).read_text()
    assert "Models" in text and "Singular-value spectra" not in text and "Speed vs quality" not in text
    assert len(_pngs(text)) == 1  # the ranks plot


def test_report_from_real_bench(tmp_path):
    import importlib.util

    from lrc.measure.bench import bench

    spec = importlib.util.spec_from_file_location("_lrc_test_bench", Path(__file__).with_name("test_bench.py"))
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)
    make_chain = tb.make_chain

    a = make_chain(tmp_path / "a.onnx", dim=128, layers=2)
    b = make_chain(tmp_path / "b.onnx", dim=128, layers=2, rank=16)
    res = bench([a, b], threads=1, seq_lens=(16,), warmup=1, runs=3, memory=False)
    text = R.write_report([res], tmp_path / "bench.html").read_text()
    assert len(_pngs(text)) == 1 and ">a<" in text and ">b<" in text


def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
        if Path(c).is_file():
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium: install it (apt-get install -y chromium) "
                                                 "to render the report headlessly")
def test_renders_in_headless_chromium(tmp_path):
    html = R.write_report([fake_bench(), fake_variants()], tmp_path / "report.html", summaries=[fake_summary()])
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
           html.resolve().as_uri()]
    t0 = time.time()
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), f"no screenshot after {time.time() - t0:.1f}s: {cp.stderr[-2000:]}"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    rgb = img[..., :3]
    # not blank: many distinct colours, a good share of non-white pixels (text, tables, plots)
    nonwhite = float((rgb.mean(axis=2) < 0.95).mean())
    assert nonwhite > 0.05, nonwhite
    colours = np.unique((rgb[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50
