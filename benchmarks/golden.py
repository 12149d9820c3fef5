"""Byte-for-byte check of a behaviour-preserving change: the same commands, two versions of lrc.

A refactor must not move a number. This script runs a fixed set of `lrc` commands (and a few
calls of the Python API) that together walk every compression path — the default recipe,
the one-shot methods, int8 factors, quantise-and-correct in every form, the sequential
correction, SmoothQuant, embeddings, target runtimes, budgets, --quantize-rest, folders and
files, a model in memory — once with the code of a git revision (checked out in a temporary
worktree) and once with the working tree, on the same exported models, and compares:

* every output model's bytes (the .onnx and its external data): must be identical;
* every number in the summaries (lrc.json, the API's report, analyse --json): must be equal;
  keys that were added or dropped are listed (a report's shape may change in a refactor,
  its numbers may not). Timings, paths and the calibration cache's seconds are ignored.

    python benchmarks/golden.py --against main          # about 12 min on 2 cores per side
    python benchmarks/golden.py --against HEAD~3 --only smollm2-int4-corr,minilm-rest

A revision's results are kept in bench-out/golden/old-SHA.json, so a rerun runs only the
working tree. Calibration uses 2048 tokens (the paths, not the quality, are under test) and a fresh cache
directory for each side, so statistics really are computed by each version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAL = ["--calib-tokens", "2048"]
S, M = "{smollm2}", "{minilm}"

# name -> argv of `lrc` ({smollm2} / {minilm}: the exported folders; {out}: the output path)
COMMANDS: dict[str, list[str]] = {
    "smollm2-default": ["compress", S, "--ratio", "0.8", *CAL],
    "smollm2-svd-llm-plain": ["compress", S, "--ratio", "0.8", "--recipe", "plain",
                              "--method", "svd-llm", "--exclude", "head", *CAL],
    "smollm2-asvd-target": ["compress", S, "--target-params", "0.85", "--method", "asvd",
                            "--no-update", *CAL],
    "smollm2-svd-int8": ["compress", S, "--ratio", "0.5", "--method", "svd", "--include", "ffn",
                         "--int8"],
    "smollm2-int4-corr": ["compress", S, "--quantize", "int4", "--correct-rank", "32,head=128",
                          *CAL],
    "smollm2-int4-seq": ["compress", S, "--quantize", "int4", "--correct-rank", "32", "--update",
                         *CAL],
    "smollm2-int4-add-emb4": ["compress", S, "--quantize", "int4,ffn.down=int8-weight",
                              "--correct-rank", "16", "--correct-form", "add",
                              "--embedding", "int4", "--block-size", "64", *CAL],
    "smollm2-int8-smooth": ["compress", S, "--quantize", "int8", "--smooth", "0.5", *CAL],
    "smollm2-int4-auto": ["compress", S, "--quantize", "int4", "--correct-rank", "auto",
                          "--correct-budget", "6", *CAL],
    "smollm2-lowrank-quant": ["compress", S, "--ratio", "0.9", "--quantize", "int4",
                              "--correct-rank", "32", "--no-update", *CAL],
    "smollm2-openvino": ["compress", S, "--quantize", "int8-weight", "--target-runtime",
                         "openvino", "--correct-rank", "32", *CAL],
    "smollm2-svd-file": ["compress", S + "/model.onnx", "--rank", "64", "--method", "svd",
                         "--include", "attn"],
    "minilm-rest": ["compress", M, "--ratio", "0.7", "--exclude", "head", "--group-inputs",
                    "--update", "--quantize-rest", "int8", "--method", "svd-llm", "--int8", *CAL],
    "minilm-default": ["compress", M, "--ratio", "0.8", *CAL],
    "minilm-tract": ["compress", M, "--quantize", "int8-weight", "--target-runtime", "tract"],
    "minilm-full": ["compress", M, "--rank", "full"],
    "minilm-analyse": ["analyse", M, "--ratio", "0.5", "--json"],
}

# name -> Python run with ``lrc`` importable; SMOLLM2 / OUT are set; prints the report as JSON
# and saves the model to OUT (the API's in-memory paths)
API = {
    "api-in-memory-svd-llm": (
        "import json, lrc, lrc.model\n"
        "m = lrc.model.load(SMOLLM2 + '/model.onnx')\n"
        "m, rep = lrc.compress(m, ratio=0.8, include=['ffn'], calib_tokens=2048)\n"
        "lrc.model.save(m, OUT)\n"
        "print(json.dumps(rep))\n"),
    "api-quantize": (
        "import json, lrc, lrc.model\n"
        "m, rep = lrc.compress(SMOLLM2, quantize='int4', correct_rank=32, calib_tokens=2048)\n"
        "lrc.model.save(m, OUT)\n"
        "print(json.dumps(rep))\n"),
}

IGNORED_KEYS = {"seconds", "input", "output", "time", "path", "model", "file", "cache"}


def run(code_dir: Path, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "LRC_CACHE_DIR": str(cache),
           "PYTHONPATH": str(code_dir)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=code_dir)


def fingerprint(path: Path) -> dict[str, str]:
    """sha256 of every model file and external-data file under ``path`` (a file or folder)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    data = Path(str(path) + ".data")
    if path.is_file() and data.is_file():
        out[data.name] = hashlib.sha256(data.read_bytes()).hexdigest()
    return out


def numbers(obj, prefix="") -> dict[str, object]:
    """Every leaf of a JSON value by its path; ignored keys dropped."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in IGNORED_KEYS or k.startswith("seconds"):
                continue
            out.update(numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def side(code_dir: Path, models: dict[str, Path], work: Path, names: list[str]) -> dict:
    """Run every chosen command with the code in ``code_dir``; what each wrote."""
    cache = Path(tempfile.mkdtemp(prefix="lrc-golden-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        t = time.perf_counter()
        out = work / name
        if name in API:
            out = work / f"{name}.onnx"
            for old in work.glob(f"{name}.onnx*"):  # the API's save refuses to overwrite
                old.unlink()
            code = f"SMOLLM2 = {str(models['smollm2'])!r}\nOUT = {str(out)!r}\n" + API[name]
            r = run(code_dir, ["-c", code], cache)
            summary = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
        else:
            args = [a.format(**{k: str(v) for k, v in models.items()}) for a in COMMANDS[name]]
            if args[0] == "compress":
                if "/model.onnx" in args[1]:
                    out = work / f"{name}.onnx"
                args += ["-o", str(out), "--force"]
            r = run(code_dir, ["-m", "lrc.cli", *args], cache)
            summary = None
            if r.returncode == 0:
                if args[0] == "analyse":
                    summary = json.loads(r.stdout)
                else:
                    js = out / "lrc.json" if out.is_dir() else Path(str(out) + ".lrc.json")
                    summary = json.loads(js.read_text())
        if r.returncode != 0:
            results[name] = {"error": (r.stderr or r.stdout).strip()[-400:]}
        else:
            results[name] = {"files": fingerprint(out) if out.exists() else {},
                             "numbers": numbers(summary)}
        print(f"  {name:28s} {'ok' if r.returncode == 0 else 'FAILED'} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    return results


def compare(old: dict, new: dict) -> int:
    bad = 0
    for name in old:
        a, b = old[name], new[name]
        if "error" in a or "error" in b:
            same = a.get("error") == b.get("error")
            print(f"{name:28s} {'same error' if same else 'DIFFERS'}: "
                  f"old {a.get('error', 'ok')!r} / new {b.get('error', 'ok')!r}")
            bad += not same
            continue
        files_same = a["files"] == b["files"]
        na, nb = a["numbers"], b["numbers"]
        changed = [k for k in na if k in nb and na[k] != nb[k]]
        dropped = [k for k in na if k not in nb]
        added = [k for k in nb if k not in na]
        ok = files_same and not changed
        bad += not ok
        print(f"{name:28s} models {'identical' if files_same else 'DIFFER'}; "
              f"{len(na) - len(dropped) - len(changed)} values equal, {len(changed)} changed, "
              f"{len(dropped)} dropped, {len(added)} added")
        for k in changed[:8]:
            print(f"    changed {k}: {na[k]!r} -> {nb[k]!r}")
        for what, keys in (("dropped", dropped), ("added", added)):
            if keys:
                print(f"    {what}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="main", help="git revision to compare with")
    ap.add_argument("--only", default="", help="comma-separated names (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "golden")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [*COMMANDS, *API]
    unknown = [n for n in names if n not in COMMANDS and n not in API]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}")
    models = {"smollm2": args.work / "smollm2", "minilm": args.work / "minilm"}
    for alias, path in (("smollm2-135m", models["smollm2"]), ("minilm-l6", models["minilm"])):
        if not (path / "model.onnx").is_file():
            r = run(ROOT, ["-m", "lrc.cli", "export", alias, "-o", str(path), "--force",
                              "--exporter", "optimum"],
                    args.work)
            if r.returncode:
                raise SystemExit(r.stderr[-400:])
    sha = subprocess.run(["git", "rev-parse", args.against], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    recorded = args.work / f"old-{sha[:12]}.json"  # a revision's results, kept for reruns
    old = json.loads(recorded.read_text()) if recorded.is_file() else {}
    todo = [n for n in names if n not in old]
    if todo:
        tree = Path(tempfile.mkdtemp(prefix="lrc-golden-")) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            print(f"{args.against} ({sha[:12]}):")
            old.update(side(tree, models, args.work / "old", todo))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        recorded.write_text(json.dumps(old, indent=1))
    else:
        print(f"{args.against} ({sha[:12]}): recorded in {recorded}")
    old = {n: old[n] for n in names}
    print("working tree:")
    new = side(ROOT, models, args.work / "new", names)
    bad = compare(old, new)
    print(f"{len(names) - bad} of {len(names)} identical" if bad else
          f"all {len(names)} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
