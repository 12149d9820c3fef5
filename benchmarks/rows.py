"""Rerun a few rows of BENCHMARKS.md with the CLI and compare their quality numbers digit by digit.

The pipeline is deterministic, so a refactor that keeps behaviour reproduces the printed
perplexities / Pearson r of BENCHMARKS.md exactly. This script reruns the commands
`benchmarks/run.py` runs for the chosen rows (`lrc compress ... --method ... --calib-tokens 16384`,
then `lrc eval DENSE NEW --max-tokens 4096 --threads 2`), prints the numbers formatted as
BENCHMARKS.md prints them next to the recorded ones, and exits 1 when any differs.

    python benchmarks/rows.py                 # the default rows (about 8 min on 2 cores)
    python benchmarks/rows.py --rows smollm2:svd-llm-nohead-0.8 --out bench-out/rows

Speed columns are not checked: timings are noise, not behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import fmt_quality  # noqa: E402  (the digits BENCHMARKS.md prints)

ALIASES = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}
# key -> (BENCHMARKS.md label, compress flags)
ROWS = {
    "smollm2:svd-llm-nohead-0.8": ("SVD-LLM all but head 0.8",
                                   ["--ratio", "0.8", "--exclude", "head", "--method", "svd-llm"]),
    "smollm2:svd-ffn-0.8": ("SVD MLP 0.8", ["--ratio", "0.8", "--include", "ffn", "--method", "svd"]),
    "smollm2:svd-llm-gupd-nohead-0.8": ("SVD-LLM grouped+update, all but head 0.8",
                                        ["--ratio", "0.8", "--exclude", "head", "--group-inputs",
                                         "--update", "--method", "svd-llm"]),
    "minilm:svd-llm-gupd-nohead-0.7-q": ("SVD-LLM grouped+update 0.7 +int8 +rest int8",
                                         ["--ratio", "0.7", "--exclude", "head", "--group-inputs",
                                          "--update", "--quantize-rest", "int8", "--method",
                                          "svd-llm", "--int8"]),
    "minilm:svd-llm-g-ffn-0.8": ("SVD-LLM grouped, MLP 0.8",
                                 ["--ratio", "0.8", "--include", "ffn", "--group-inputs",
                                  "--method", "svd-llm"]),
}
DEFAULT = ["smollm2:svd-llm-nohead-0.8", "smollm2:svd-ffn-0.8",
           "minilm:svd-llm-gupd-nohead-0.7-q", "minilm:svd-llm-g-ffn-0.8"]


CACHE = tempfile.mkdtemp(prefix="lrc-rows-cache-")  # fresh: calibration really runs


def lrc(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
                            "LRC_CACHE_DIR": CACHE})
    if r.returncode != 0:
        raise SystemExit(f"lrc {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def recorded(label: str, section: str) -> list[str]:
    """The quality cells of a BENCHMARKS.md row: [news, docs] for LMs, [Lee r] for MiniLM."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    part = text.split("## ")[1 if section == "smollm2" else 2]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            if section == "smollm2":
                return [re.split(r"\s+\(", cells[3])[0], re.split(r"\s+\(", cells[4])[0]]
            return [cells[3]]
    raise SystemExit(f"row {label!r} not in BENCHMARKS.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "rows")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for key in args.rows.split(","):
        model, _ = key.split(":")
        label, flags = ROWS[key]
        dense = args.out / model
        if not (dense / "model.onnx").is_file():
            lrc("export", ALIASES[model], "-o", str(dense), "--force", "--exporter", "optimum")
        new = args.out / key.replace(":", "-")
        t = time.perf_counter()
        lrc("compress", str(dense), "-o", str(new), "--force", "--recipe", "plain", *flags,
            *(["--calib-tokens", "16384"] if "svd-llm" in flags else []))
        res = json.loads(lrc("eval", str(dense), str(new), "--max-tokens", "4096", "--threads", "2",
                             "--json"))
        if res["kind"] == "causal-lm":
            got = [fmt_quality(res[k]["new"]["perplexity"]) for k in ("in_domain", "out_of_domain")]
        else:
            got = [f"{res['in_domain']['new']['lee_pearson']:.3f}"]
        want = recorded(label, model)
        same = got == want
        bad += not same
        print(f"{key:36s} BENCHMARKS.md {' / '.join(want):>16s}  now {' / '.join(got):>16s}  "
              f"{'same' if same else 'DIFFERS'}  ({time.perf_counter() - t:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
