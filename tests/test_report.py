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


# ---------------------------------------------------------------------------- bench + eval joined

def _lm_compare(orig: str, new: str, text: str, ppl_o: float, ppl_n: float) -> dict:
    return {"orig": {"model": orig, "perplexity": ppl_o, "nll": 1.0},
            "new": {"model": new, "perplexity": ppl_n, "nll": 1.1}, "ppl_ratio": ppl_n / ppl_o,
            "kl": 0.1, "top1_agreement": 0.9, "top5_agreement": 0.99, "logits_cosine": 0.98,
            "text": text, "context": 256, "stride": 256, "windows": 4, "tokens": 1020,
            "text_tokens": 1020, "bos": "BOS"}


def _lm_eval(orig: str, new: str, news: float, docs: float) -> dict:
    """One model's ``lrc eval --save`` result (dense perplexity 30 news / 20 docs)."""
    return {"kind": "causal-lm", "in_domain": _lm_compare(orig, new, "news", 30.0, news),
            "out_of_domain": _lm_compare(orig, new, "docs", 20.0, docs)}


def fake_lm_bench(base: str = "/tmp/keep") -> dict:
    """dense, lrc, q4c and two ORT baselines kept in ``base`` (``lrc bench --keep-baselines``)."""
    models = [("dense", "out/dense/model.onnx", None, 540e6, 1.0, 1.0),
              ("dense-lrc", "out/dense-lrc/model.onnx", None, 470e6, 1.1, 1.05),
              ("dense-q4c", "out/dense-q4c/model.onnx", None, 190e6, 0.9, 1.8),
              ("dense+int8-dynamic", f"{base}/int8-dynamic.onnx", "int8-dynamic", 140e6, 0.95, 1.2),
              ("dense+int4-matmulnbits", f"{base}/int4-matmulnbits.onnx", "int4-matmulnbits", 180e6,
               0.88, 1.77)]
    runs = []
    for name, _, _, _, prefill, decode in models:
        for phase, sp in (("prefill", prefill), ("decode", decode)):
            runs.append({"model": name, "ep": "cpu", "phase": phase, "batch": 1, "seq": 128,
                         "decode_tokens": 16 if phase == "decode" else None, "n": 10,
                         "p50_ms": 10 / sp, "p90_ms": 11 / sp, "p99_ms": 12 / sp, "mean_ms": 10 / sp,
                         "std_ms": 0.1, "min_ms": 9 / sp, "speedup": sp, "tokens_per_s": None})
    return {"schema": "lrc.bench/1", "settings": {"eps": ["cpu"]}, "runs": runs,
            "models": [{"name": n, "path": p, "baseline": b, "kind": "decoder", "size_bytes": int(sz),
                        "bytes_read": int(sz * 0.9)} for n, p, b, sz, _, _ in models]}


def fake_eval_many(base: str = "/tmp/keep") -> dict:
    """``lrc eval out/dense out/dense-lrc out/dense-q4c BASE/int8-dynamic.onnx --save``."""
    news = ["out/dense-lrc/model.onnx", "out/dense-q4c/model.onnx", f"{base}/int8-dynamic.onnx"]
    ppl = [(200.0, 90.0), (33.0, 22.0), (7.7e7, 6e7)]
    return {"schema": "lrc.eval/1", "kind": "causal-lm", "orig": "out/dense/model.onnx", "new": news,
            "results": [_lm_eval("out/dense/model.onnx", n, a, b) for n, (a, b) in zip(news, ppl)]}


def test_join_bench_and_eval_into_variants():
    bench = fake_lm_bench()
    # several models in one eval, plus a one-model eval (today's shape) of the int4 baseline,
    # evaluated from another folder: matched by name (DENSE+int4-matmulnbits <- int4-matmulnbits.onnx)
    single = _lm_eval("out/dense/model.onnx", "/elsewhere/int4-matmulnbits.onnx", 46.0, 26.0)
    j = R.join_bench_eval(bench, [fake_eval_many(), single])
    assert [m["label"] for m in j["models"]] == ["dense", "dense-lrc", "dense-q4c", "ORT int8", "ORT int4"]
    assert j["unmatched_bench"] == [] and j["unmatched_eval"] == []
    titles = [it["title"] for it in j["items"]]
    assert titles == ["decode per token (cpu, batch 1, seq 128)", "prefill (cpu, batch 1, seq 128)",
                      "model file"]
    decode, prefill, size = j["items"]
    assert size["x"] == "size_mb" and "x" not in decode
    v = {(x["name"], x["metric"]): x for x in decode["variants"]}
    assert len(v) == 5 * 2  # every model x (news, docs)
    assert v["dense", "perplexity (news)"]["speedup"] == 1.0
    assert v["dense", "perplexity (news)"]["quality"] == 30.0  # the eval's original
    assert v["dense", "perplexity (docs)"]["quality"] == 20.0
    assert v["dense-q4c", "perplexity (docs)"] == {
        "name": "dense-q4c", "speedup": 1.8, "quality": 22.0, "metric": "perplexity (docs)",
        "higher_is_better": False, "size_mb": 190.0}
    assert v["ORT int4", "perplexity (news)"]["quality"] == 46.0
    assert {x["speedup"] for x in prefill["variants"] if x["name"] == "ORT int8"} == {0.95}
    s = {(x["name"], x["metric"]): x for x in size["variants"]}
    assert s["ORT int8", "perplexity (news)"]["size_mb"] == 140.0 and "speedup" not in s["ORT int8", "perplexity (news)"]


def test_join_reports_what_did_not_match():
    bench = fake_lm_bench()
    ev = fake_eval_many()
    ev["new"][1] = ev["results"][1]["in_domain"]["new"]["model"] = "out/other/model.onnx"
    j = R.join_bench_eval(bench, [ev])
    assert [m["name"] for m in j["models"]] == ["dense", "dense-lrc", "dense+int8-dynamic"]
    assert j["unmatched_bench"] == ["dense-q4c", "dense+int4-matmulnbits"]
    assert j["unmatched_eval"] == ["out/other/model.onnx"]
    assert R.join_bench_eval(bench, [])["items"] == []


def test_report_of_bench_and_eval(tmp_path):
    text = R.write_report([fake_lm_bench(), fake_eval_many()], tmp_path / "r.html").read_text()
    # speedup bars; decode and prefill speed vs news / docs perplexity; file size vs both
    assert len(_pngs(text)) == 1 + 2 + 2 + 2
    assert "Speed vs quality: decode per token" in text and "Speed vs quality: prefill" in text
    assert "Size vs quality: model file" in text and "<h2>Quality</h2>" in text
    assert "dense-q4c" in text and "ORT int8" in text
    assert "7.7e+07" in text  # drawn off scale, in the tables as it is
    # an eval alone: its quality table, no plots
    text = R.write_report([fake_eval_many()], tmp_path / "q.html").read_text()
    assert "<h2>Quality</h2>" in text and not _pngs(text)


def test_size_axis_pareto_prefers_smaller():
    item = {"x": "size_mb", "metric": "ppl", "higher_is_better": False,
            "variants": [{"name": "big", "size_mb": 500.0, "quality": 30.0},
                         {"name": "small", "size_mb": 100.0, "quality": 40.0},
                         {"name": "bad", "size_mb": 300.0, "quality": 50.0}]}
    html = R._variants_section(item)
    rows = re.findall(r"<tr><td class=\"l\">(\w+)</td>.*?</tr>", html)
    assert rows == ["big", "small", "bad"]
    assert html.count(">yes<") == 2 and re.search(r">bad<.*?<td class=\"\"></td></tr>", html)


def test_bench_keeps_baselines_beside_tokenizer_and_eval_joins_them(tmp_path):
    """``bench(baselines_dir=)`` keeps ORT's baselines with the dense model's tokenizer and
    config beside them, ``evaluate_many`` measures those files, and the report joins them."""
    from test_evaluate import _text, _weights, write_lm

    from lrc.measure import bench as B
    from lrc.measure import quality as E

    w = _weights()
    dense = write_lm(tmp_path / "dense", w)
    u, s, vt = np.linalg.svd(w["W1"], full_matrices=False)
    lr = write_lm(tmp_path / "lr", w, low_rank_w1=(u[:, :2] * s[:2], vt[:2]))
    keep = tmp_path / "baselines"
    res = B.bench([dense, lr], threads=1, seq_lens=(16,), decode_tokens=2, warmup=1, runs=2,
                  baselines_dir=keep, baselines=True, memory=False, amdahl=False)
    made = [Path(m["path"]) for m in res["models"] if m["baseline"]]
    assert made and all(p.parent == keep and p.is_file() for p in made)
    assert (keep / "tokenizer.json").is_file() and (keep / "config.json").is_file()
    ev = E.evaluate_many(dense, [lr, *made], text=_text(), context=32, max_tokens=200)
    j = R.join_bench_eval(res, [ev])
    assert [m["name"] for m in j["models"]] == [m["name"] for m in res["models"]]
    assert j["models"][0]["label"] == "dense" and not j["unmatched_eval"]
    assert [it["title"].split(" (")[0] for it in j["items"]] == ["decode per token", "prefill", "model file"]


def fake_peers() -> dict:
    """``benchmarks/peers.py --json``'s shape: two points and a peer that could not run."""
    return {"date": "2026-12-04", "machine": "Test CPU", "max_tokens": 2048,
            "dense": {"news": 34.9, "docs": 19.2},
            "rows": [{"name": "NNCF INT4_SYM g32", "bytes": 90_000_000, "x_news": 1.14,
                      "x_docs": 1.10, "why": None},
                     {"name": "llama.cpp Q4_K_M", "bytes": 105_000_000, "x_news": 1.08,
                      "x_docs": 1.06, "why": None},
                     {"name": "ORT MatMulNBitsQuantizer HQQ", "bytes": 121_000_000,
                      "bytes_read": 104_000_000, "x_news": 1.09, "x_docs": 1.12, "why": None,
                      "date": "2026-12-05", "machine": "Other CPU"},
                     {"name": "NNCF + lora_correction", "bytes": None, "x_news": None,
                      "x_docs": None, "why": "did not finish in 28 min"}]}


def test_report_puts_peers_beside_this_runs_models(tmp_path):
    """Peers' points join the bench + eval as ratios to each run's own dense perplexity."""
    models = R.join_bench_eval(fake_lm_bench(), [fake_eval_many()])["models"]
    html = R._peers_section(fake_peers(), models, [fake_eval_many()])
    assert len(_pngs(html)) == 1
    rows = dict(re.findall(r'<td class="l">[^<]*</td><td class="l">([^<]+)</td>(.*?)</tr>', html))
    # dense-q4c: 33 / 30 news, 22 / 20 docs at 190 MB (171 read per token); the dense model is
    # not a point; a peer without bytes_read stands at its file size (≈), one with it at that
    assert re.findall(r">([\d.]+)<", rows["dense-q4c"]) == ["190.0", "171.0", "1.100", "1.100"]
    assert "dense" not in rows and re.findall(r">(?:≈ )?([\d.]+)<", rows["llama.cpp Q4_K_M"]) == [
        "105.0", "105.0", "1.080", "1.060"] and "≈ 105.0" in rows["llama.cpp Q4_K_M"]
    assert re.findall(r">([\d.]+)<", rows["ORT MatMulNBitsQuantizer HQQ"]) == [
        "121.0", "104.0", "1.090", "1.120"]
    assert "MB read per token" in html
    assert "did not finish in 28 min" in rows["NNCF + lora_correction"]
    assert "2048 tokens per text" in html and "1020 scored tokens" in html
    # a JSON of merged runs says when and where each ran
    assert "2026-12-04 (Test CPU); 2026-12-05 (Other CPU)" in html
    text = R.write_report([fake_lm_bench(), fake_eval_many(), fake_peers()],
                          tmp_path / "r.html").read_text()
    assert "Quality per byte: this report" in text and len(_pngs(text)) == 1 + 2 + 2 + 2 + 1
    # peers without an LM bench + eval to stand beside: no section
    assert "Quality per byte" not in R.render_report([fake_eval_many(), fake_peers()])


def test_a_peer_on_the_references_own_grid_is_said_so():
    """A peer whose weights are the reference GGUF's own again (peers.py's on_source_grid) is
    named so in the table; the others are not."""
    peers = fake_peers()
    peers["rows"][1]["on_source_grid"] = {"weights_identical": 0.99997, "on_grid": True}
    peers["rows"][0]["on_source_grid"] = {"weights_identical": 0.2, "on_grid": False}
    models = R.join_bench_eval(fake_lm_bench(), [fake_eval_many()])["models"]
    html = R._peers_section(peers, models, [fake_eval_many()])
    rows = dict(re.findall(r'<td class="l">[^<]*</td><td class="l">([^<]+)</td>(.*?)</tr>', html))
    assert "llama.cpp Q4_K_M (the reference&#x27;s own grid again)" in rows
    assert "NNCF INT4_SYM g32" in rows and len(_pngs(html)) == 1
