"""Quality per byte: lrc's points and every peer's on the same weights and texts, one plot.

Reads what two scripts measured on SmolLM2-135M with lrc's protocol (perplexity on 2048 tokens
of news and of Python docs, a domain absent from calibration, as a ratio to the dense export's):

* ``bench-out/genai-builder/results.json`` (``benchmarks/genai_builder.py``): lrc's rows and
  ONNX Runtime GenAI's builder int4, compressed from the builder's fp32 graph;
* ``benchmarks/peers-smollm2.json`` (``benchmarks/peers.py``): NNCF on OpenVINO, llama.cpp.

and writes ``benchmarks/pareto-smollm2.png`` (perplexity ratio against the model files' bytes on
disk, one panel per text) and, with ``--write``, a table of every point sorted by bytes into
BENCHMARKS.md between ``<!-- pareto:begin -->`` and ``<!-- pareto:end -->``.

    python benchmarks/pareto.py --write

Bytes are the model's own files (.onnx + external data, OpenVINO's .xml + .bin, the .gguf):
what a device stores. The reference weights are a dequantised Q4_1 GGUF (asymmetric, block
32): llama.cpp's K-quants (asymmetric sub-blocks of 32) can land near that grid and flatter
themselves here; lrc's, NNCF's INT4_SYM and the builder's codes are symmetric and cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from genai_builder import model_bytes, variant  # noqa: E402
from quant import write_section  # noqa: E402

BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"
# the builder run's models that are points of their own (not the dense / fp32 references)
SKIP = {"builder-fp32"}


def lrc_points(results: dict) -> list[dict]:
    """Every model of the builder run, with its perplexity ratios and model-file bytes."""
    out_dir = Path(results["args"]["out"])
    names = ["builder-fp32", "builder-int4",
             *[k for k in results["args"]["variants"].split(",") if k]]
    ev = results["eval"]["results"]
    d_news = ev[0]["in_domain"]["orig"]["perplexity"]
    d_docs = ev[0]["out_of_domain"]["orig"]["perplexity"]
    folders = {"builder-int4": out_dir / f"{results.get('model', 'smollm2')}-int4"}
    pts = []
    for name, r in zip(names, ev):
        if name in SKIP:
            continue
        size = (results.get("model_bytes") or {}).get(name)
        folder = folders.get(name, out_dir / name)
        if size is None and folder.is_dir():
            size = model_bytes(folder)
        if size is None:
            continue
        who = "ORT GenAI builder" if name.startswith("builder") else "lrc"
        label = ("int4 (RTN, block 32, embedding shared int4)" if name == "builder-int4"
                 else variant(name)[0].split(" (`")[0])
        pts.append({"who": who, "name": name, "label": label, "bytes": size,
                    "x_news": r["in_domain"]["new"]["perplexity"] / d_news,
                    "x_docs": r["out_of_domain"]["new"]["perplexity"] / d_docs,
                    "seconds": (results.get("compress_s") or {}).get(name)})
    return pts


def peer_points(peers: dict) -> tuple[list[dict], list[dict]]:
    """``(points, rows that could not run)`` of peers.py's JSON."""
    pts, missing = [], []
    for r in peers["rows"]:
        if r.get("x_news") is None:
            missing.append(r)
            continue
        who = "NNCF (OpenVINO)" if r["name"].startswith("NNCF") else (
            "llama.cpp" if r["name"].startswith("llama.cpp") else r["name"].split()[0])
        pts.append({"who": who, "name": r["name"], "label": r["name"], "bytes": r["bytes"],
                    "x_news": r["x_news"], "x_docs": r["x_docs"],
                    "seconds": r.get("compress_s")})
    return pts, missing


STYLE = {"lrc": ("tab:blue", "o"), "ORT GenAI builder": ("tab:red", "s"),
         "NNCF (OpenVINO)": ("tab:green", "^"), "llama.cpp": ("tab:purple", "D")}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for ax, key, text in ((axes[0], "x_news", "news (calibration's domain)"),
                          (axes[1], "x_docs", "Python docs (absent from calibration)")):
        for who in dict.fromkeys(p["who"] for p in points):
            ps = sorted((p for p in points if p["who"] == who), key=lambda p: p["bytes"])
            color, marker = STYLE.get(who, ("tab:gray", "x"))
            ax.scatter([p["bytes"] / 1e6 for p in ps], [p[key] for p in ps], c=color,
                       marker=marker, label=who, s=36, zorder=3)
        # the lower envelope: the best perplexity at each size or less
        best, env = float("inf"), []
        for p in sorted(points, key=lambda p: p["bytes"]):
            if p[key] < best:
                best = p[key]
                env.append((p["bytes"] / 1e6, best))
        ax.step([e[0] for e in env], [e[1] for e in env], where="post", color="0.6", lw=1,
                zorder=1, label="best at this size or less")
        ax.set_xlabel("model files on disk (MB)")
        ax.set_ylabel("perplexity / dense")
        ax.set_title(text)
        ax.grid(alpha=0.3)
        ax.set_ylim(0.99, max(p[key] for p in points) * 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(points: list[dict], missing: list[dict], peers: dict, results: dict,
           png: Path) -> str:
    rows = []
    for p in sorted(points, key=lambda p: p["bytes"]):
        secs = f"{p['seconds']:.0f} s" if p.get("seconds") else "-"
        rows.append(f"| {p['who']} | {p['label']} | {p['bytes'] / 1e6:.1f} MB | "
                    f"x{p['x_news']:.3f} / x{p['x_docs']:.3f} | {secs} |")
    for r in missing:
        rows.append(f"| {r['name'].split()[0]} | {r['name']} | - | {r['why']} | - |")
    return "\n".join([
        BEGIN, "",
        "## Quality per byte: lrc against NNCF, llama.cpp and the model builder (SmolLM2-135M)",
        "",
        f"`python benchmarks/pareto.py --write` from `benchmarks/genai_builder.py` "
        f"({results['date']}) and `benchmarks/peers.py` ({peers['date']}), the same dense "
        f"weights and texts: perplexity on {peers['max_tokens']} tokens of news and of Python "
        f"docs (absent from calibration), as a ratio to lrc's dense export "
        f"({peers['dense']['news']:.2f} / {peers['dense']['docs']:.2f}; each peer's float "
        f"model reproduced it first: " + "; ".join(c.split(":")[0] + " ok" for c in
                                                   peers.get("checks", [])) + "). Bytes: the "
        f"model's own files. Compression time as measured in those runs on a shared 2-core "
        f"machine (its load varied). SmolLM2's reference is a dequantised Q4_1 GGUF "
        f"(asymmetric, block 32): llama.cpp's K-quants can land near that grid and flatter "
        f"themselves here; lrc's, NNCF's INT4_SYM and the builder's codes are symmetric.",
        "",
        f"![perplexity against bytes]({png.name})",
        "",
        "| toolchain | setting | model files | ppl news / docs (x dense) | compress |",
        "|---|---|---|---|---|",
        *rows,
        "",
        END,
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builder", type=Path,
                    default=ROOT / "bench-out" / "genai-builder" / "results.json")
    ap.add_argument("--peers", type=Path, default=ROOT / "benchmarks" / "peers-smollm2.json")
    ap.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "pareto-smollm2.png")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args(argv)
    for p, how in ((args.builder, "python benchmarks/genai_builder.py"),
                   (args.peers, "python benchmarks/peers.py --json " + str(args.peers))):
        if not p.is_file():
            raise SystemExit(f"{p} not found: run {how} first")
    results = json.loads(args.builder.read_text())
    peers = json.loads(args.peers.read_text())
    ours = lrc_points(results)
    theirs, missing = peer_points(peers)
    points = ours + theirs
    plot(points, args.png, "SmolLM2-135M: perplexity against bytes on disk (lower left is "
                           "better)")
    section = render(points, missing, peers, results, args.png)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
