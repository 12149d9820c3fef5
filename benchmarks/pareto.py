"""Quality per byte: lrc's points and every peer's on the same weights and texts, one plot.

Reads what two scripts measured on SmolLM2-135M with lrc's protocol (perplexity on 2048 tokens
of news and of Python docs, a domain absent from calibration, as a ratio to the dense export's):

* one or more ``results.json`` of ``benchmarks/genai_builder.py`` (``--builder``, default
  ``bench-out/genai-builder/results.json``): lrc's rows, compressed from the builder's fp32
  graph, with the constants each reads per decoded token (its bench);
* ``benchmarks/peers-smollm2.json`` (``benchmarks/peers.py``): NNCF on OpenVINO, llama.cpp, the
  builder's int4 (RTN, k_quant, k_quant_mixed), ONNX Runtime's HQQ and GPTQ.

and writes ``benchmarks/pareto-smollm2.png`` (perplexity ratio against the model files' bytes on
disk and against the constants a decode step reads, one panel per text) and, with ``--write``,
a table of every point sorted by bytes into BENCHMARKS.md between ``<!-- pareto:begin -->`` and
``<!-- pareto:end -->``.

    python benchmarks/pareto.py --write
    python benchmarks/pareto.py --model gemma3 --write            # its own section
    python benchmarks/pareto.py --builder bench-out/genai-builder-time/results.json \
        bench-out/genai-builder-calib/results.json --write      # several runs' lrc points

Bytes are the model's own files (.onnx + external data, OpenVINO's .xml + .bin, the .gguf):
what a device stores. The reference weights are a dequantised Q4_1 GGUF (asymmetric, block
32): llama.cpp's K-quants, the builder's k_quant and ORT's HQQ (asymmetric blocks of 32) can
land near that grid and flatter themselves here; lrc's, NNCF's INT4_SYM, ORT's GPTQ and the
builder's RTN codes are symmetric and cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from genai_builder import model_bytes, variant  # noqa: E402
from peers import grid_note, gptq_note  # noqa: E402
from quant import write_section  # noqa: E402

BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"
# --model -> (name, where genai_builder.py writes by default, BENCHMARKS.md markers' tag)
MODELS = {"smollm2": ("SmolLM2-135M", "genai-builder", "pareto"),
          "gemma3": ("Gemma-3-270M", "genai-builder-gemma3", "pareto-gemma3")}
# a point above this is broken (ORT's GPTQ on SmolLM2, x2.1): it sits at the axis's top, its
# value written beside it, instead of flattening every other point
BROKEN = 2.0
# the builder run's models that are points of their own (not the dense / fp32 references)
SKIP = {"builder-fp32"}


def lrc_points(results: dict) -> list[dict]:
    """Every model of one builder run, with its perplexity ratios and model-file bytes (a run
    calibrated on other than 16384 tokens says so in its labels)."""
    out_dir = Path(results["args"]["out"])
    names = ["builder-fp32", "builder-int4",
             *[k for k in results["args"]["variants"].split(",") if k]]
    ev = results["eval"]["results"]
    d_news = ev[0]["in_domain"]["orig"]["perplexity"]
    d_docs = ev[0]["out_of_domain"]["orig"]["perplexity"]
    folders = {"builder-int4": out_dir / f"{results.get('model', 'smollm2')}-int4"}
    bench_name = {"builder-int4": f"{results.get('model', 'smollm2')}-int4"}
    read = {m["name"]: m.get("bytes_read") for m in (results.get("bench") or {}).get("models", [])}
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
        calib = results["args"].get("calib_tokens", 16384)
        if name == "builder-int4":
            label = "int4 (RTN, block 32, embedding shared int4)"
        else:  # what it is, and the command's arguments
            head, args = variant(name)
            args = args + (["--calib-tokens", str(calib)] if calib != 16384 else [])
            label = f"{head.split(' (`')[0]} (`{' '.join(args)}`)"
        pts.append({"who": who, "name": name, "label": label, "bytes": size,
                    "bytes_read": read.get(bench_name.get(name, name)), "read_rule": False,
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
        peer = r.get("peer") or ""
        who = ("ORT GenAI builder" if peer.startswith("builder-") else
               "ONNX Runtime quantizer" if peer.startswith("ort-") else
               "NNCF (OpenVINO)" if r["name"].startswith("NNCF") else
               "llama.cpp" if r["name"].startswith("llama.cpp") else r["name"].split()[0])
        # NNCF's IR and llama.cpp's GGUF tie the table to the head: a decode step reads
        # every weight, so their file bytes stand for the bytes read (marked in the table)
        rule = r.get("bytes_read") is None
        pts.append({"who": who, "name": r["name"], "label": r["name"], "bytes": r["bytes"],
                    "peer": peer, "bytes_read": r["bytes"] if rule else r["bytes_read"],
                    "read_rule": rule,
                    "x_news": r["x_news"], "x_docs": r["x_docs"],
                    "seconds": r.get("compress_s"),
                    "on_grid": bool((r.get("on_source_grid") or {}).get("on_grid"))})
    return pts, missing


def _flag(results: dict) -> str:
    """How a genai_builder.py run was called, briefly (its tag), for the section's source line."""
    tag = results["args"].get("tag")
    return f"--tag {tag}, " if tag else ""


def _builder_flag(paths: list[Path], model: str) -> list[str]:
    """``[--model M] [--builder ...]`` as given (nothing for the defaults), for the section's
    source line; each flag with a trailing space."""
    flags = [] if model == "smollm2" else ["--model", model]
    paths = [Path(p).resolve() for p in paths]
    if paths != [ROOT / "bench-out" / MODELS[model][1] / "results.json"]:
        flags += ["--builder"] + [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                                  for p in paths]
    return [f + " " for f in flags]


STYLE = {"lrc": ("tab:blue", "o"), "ORT GenAI builder": ("tab:red", "s"),
         "NNCF (OpenVINO)": ("tab:green", "^"), "llama.cpp": ("tab:purple", "D"),
         "ONNX Runtime quantizer": ("tab:orange", "v")}


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharey=False)
    panels = [(axes[i, j], size, key, text, xl)
              for i, (size, xl) in enumerate((("bytes", "model files on disk (MB)"),
                                              ("bytes_read", "constants read per decoded token "
                                                             "(MB)")))
              for j, (key, text) in enumerate((("x_news", "news (calibration's domain)"),
                                               ("x_docs", "Python docs (absent from "
                                                          "calibration)")))]
    for ax, size, key, text, xl in panels:
        have = [p for p in points if p.get(size)]
        ycap = max((p[key] for p in have if p[key] <= BROKEN), default=BROKEN) * 1.02
        for who in dict.fromkeys(p["who"] for p in have):
            ps = sorted((p for p in have if p["who"] == who), key=lambda p: p[size])
            color, marker = STYLE.get(who, ("tab:gray", "x"))
            # a point above the axis's top (ycap) sits on it, its value written beside it
            # hollow: a point on the reference GGUF's own grid (its loss is not the quantiser's)
            ax.scatter([p[size] / 1e6 for p in ps], [min(p[key], ycap) for p in ps],
                       facecolors=["none" if p.get("on_grid") else color for p in ps],
                       edgecolors=color, marker=marker, label=who, s=36, zorder=3)
            for p in ps:
                if p[key] > ycap:
                    ax.annotate(f"x{p[key]:.2f} (off the axis)", (p[size] / 1e6, ycap),
                                xytext=(6, -4), textcoords="offset points", fontsize=7,
                                color=color, va="top")
        # the lower envelope: the best perplexity at each size or less (not from a point
        # that is the reference's own grid again)
        best, env = float("inf"), []
        for p in sorted((p for p in have if not p.get("on_grid")), key=lambda p: p[size]):
            if p[key] < best:
                best = p[key]
                env.append((p[size] / 1e6, best))
        ax.step([e[0] for e in env], [e[1] for e in env], where="post", color="0.6", lw=1,
                zorder=1, label="best at this size or less"
                + (" (hollow left out)" if any(p.get("on_grid") for p in have) else ""))
        ax.set_xlabel(xl)
        ax.set_ylabel("perplexity / dense")
        ax.set_title(text)
        ax.grid(alpha=0.3)
        ax.set_ylim(0.99, ycap * 1.02)
    axes[0, 1].legend(fontsize=8, loc="upper right")  # where no point sits
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _against(points: list[dict]) -> str:
    """The peers measured, in words: 'NNCF, llama.cpp, ... and the model builder'."""
    words = {"NNCF (OpenVINO)": "NNCF", "llama.cpp": "llama.cpp",
             "ONNX Runtime quantizer": "ONNX Runtime's quantizers",
             "ORT GenAI builder": "the model builder"}
    have = [w for who, w in words.items() if any(p["who"] == who for p in points)]
    return ", ".join(have[:-1]) + (" and " if len(have) > 1 else "") + have[-1]


def render(points: list[dict], missing: list[dict], peers: dict, runs: list[dict],
           png: Path, paths: list[Path], model: str = "smollm2") -> str:
    name, _, tag = MODELS[model]
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    rows = []
    for p in sorted(points, key=lambda p: p["bytes"]):
        secs = f"{p['seconds']:.0f} s" if p.get("seconds") else "-"
        read = ("-" if not p.get("bytes_read") else
                f"{'≈ ' if p['read_rule'] else ''}{p['bytes_read'] / 1e6:.1f} MB")
        label = p["label"] + (" — on the reference's own grid" if p.get("on_grid") else "")
        rows.append(f"| {p['who']} | {label} | {p['bytes'] / 1e6:.1f} MB | {read} | "
                    f"x{p['x_news']:.3f} / x{p['x_docs']:.3f} | {secs} |")
    for r in missing:
        rows.append(f"| {r['name'].split()[0]} | {r['name']} | - | - | {r['why']} | - |")
    return "\n".join([
        begin, "",
        f"## Quality per byte: lrc against {_against(points)} ({name})",
        "",
        f"`python benchmarks/pareto.py {''.join(_builder_flag(paths, model))}--write` from "
        f"`benchmarks/genai_builder.py` ("
        + "; ".join(f"{_flag(r)}{r['date']}" for r in runs) +
        f") and `benchmarks/peers.py` ({peers['date']}), the same dense "
        f"weights and texts: perplexity on {peers['max_tokens']} tokens of news and of Python "
        f"docs (absent from calibration), as a ratio to lrc's dense export "
        f"({peers['dense']['news']:.2f} / {peers['dense']['docs']:.2f}; each peer's float "
        f"model reproduced it first: " + "; ".join(c.split(":")[0] + " ok" for c in
                                                   peers.get("checks", [])) + "). Bytes: the "
        f"model's own files. Compression time as measured in those runs on a shared 2-core "
        f"machine (its load varied). Read per token: the constants a decode step reads "
        f"(`lrc.graph.locate.bytes_read_per_token`: every weight but a table only a Gather "
        f"reads; float16 scales count as the float32 ONNX Runtime folds them to); ≈: NNCF's IR "
        f"and llama.cpp's GGUF, whose embedding table is also the head, read every weight, so "
        f"their file size stands for it. {peers.get('caveat', '')} lrc's codes are symmetric."
        + "".join(f" {n}" for n in [gptq_note(peers["rows"]), grid_note(peers["rows"])] if n),
        "",
        f"![perplexity against bytes]({png.name})",
        "",
        "| toolchain | setting | model files | read per token | ppl news / docs (x dense) | "
        "compress |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        end,
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--builder", type=Path, nargs="+", default=None,
                    help="genai_builder.py results (several: each model once, the first run's "
                         "where a name repeats; default bench-out/genai-builder[-gemma3]/"
                         "results.json)")
    ap.add_argument("--peers", type=Path, default=None, help="default benchmarks/peers-MODEL.json")
    ap.add_argument("--png", type=Path, default=None, help="default benchmarks/pareto-MODEL.png")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args(argv)
    name, folder, tag = MODELS[args.model]
    args.builder = args.builder or [ROOT / "bench-out" / folder / "results.json"]
    args.peers = args.peers or ROOT / "benchmarks" / f"peers-{args.model}.json"
    args.png = args.png or ROOT / "benchmarks" / f"pareto-{args.model}.png"
    for p, how in ([(b, "python benchmarks/genai_builder.py") for b in args.builder]
                   + [(args.peers, "python benchmarks/peers.py --json " + str(args.peers))]):
        if not p.is_file():
            raise SystemExit(f"{p} not found: run {how} first")
    runs = [json.loads(b.read_text()) for b in args.builder]
    peers = json.loads(args.peers.read_text())
    theirs, missing = peer_points(peers)
    ours, seen = [], {p["peer"] for p in theirs}  # the peers' own builder-int4 row wins
    for results in runs:
        for p in lrc_points(results):
            # a variant that does not calibrate gives the same figures in every run: once
            key = (p["name"] if p["who"] != "lrc" else
                   (p["name"], round(p["x_news"], 4), round(p["x_docs"], 4)))
            if key not in seen:
                seen.add(key)
                ours.append(p)
    points = ours + theirs
    plot(points, args.png, f"{name}: perplexity against bytes on disk (top) and bytes "
                           "read per decoded token (bottom); lower left is better")
    section = render(points, missing, peers, runs, args.png, args.builder, args.model)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, f"<!-- {tag}:begin -->",
                      f"<!-- {tag}:end -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
