"""lrc on ONNX Runtime GenAI's model-builder graphs, against the builder's own int4, in one run.

What a user deploys to a device is the model builder's fused graph (GroupQueryAttention,
SkipSimplifiedLayerNormalization, packed QKV, the tied embedding and head shared in int4). This
script

1. makes the builder's fp32 and int4 folders of the bundled LM (benchmarks/builder.py: an
   environment of its own, transformers >= 5) and lrc's own dense export (optimum's graph);
2. compresses the builder's fp32 folder (``--source fp16``: its fp16 one) with lrc (each of ``VARIANTS``: quantised to int4 with
   the whitened low-rank correction, in the builder's fused graph);
3. evaluates every model against the dense export on both texts (news, in the calibration's
   domain; Python docs, absent from it: lrc's protocol, windows of 256, ``--max-tokens``);
4. times them in one interleaved ``lrc bench`` run (prefill of 128 tokens, decode per token);
5. prints a markdown table (ratios to dense perplexity, speed relative to the builder's int4,
   folder bytes relative to the builder's int4) with the CPU's flags, and with ``--write`` puts
   it into BENCHMARKS.md between ``<!-- genai-builder:begin -->`` and ``<!-- genai-builder:end -->``.

    python benchmarks/genai_builder.py --write        # ~30 min on 2 cores (builder env once)
    python benchmarks/genai_builder.py --model gemma3 --write   # Gemma-3-270M, its own section
    python benchmarks/genai_builder.py --source fp16 --variants lrc-default,lrc-size-105 --write
                                   # from the builder's fp16 folder (float16 scales), its own section

The reference weights are dequantised GGUFs (SmolLM2 from Q4_1: asymmetric, block 32; Gemma-3
from Q4_K_M: 6-bit scales and mins per 32 inside 256-blocks); every int4 here is symmetric
round-to-nearest on blocks of 32 (ONNX Runtime's grid and lrc's), so none lands on the source's
grid.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quant import isa_flags, machine_line, write_section  # noqa: E402

# model -> (name, the source GGUF in words, the dense export's source for `lrc export`, marker)
MODELS = {
    "smollm2": ("SmolLM2-135M", "a dequantised Q4_1 GGUF", "smollm2-135m", "genai-builder"),
    "gemma3": ("Gemma-3-270M", "a dequantised Q4_K_M GGUF", None, "genai-builder-gemma3"),
}


def markers(model: str, source: str = "fp32", tag: str = "") -> tuple[str, str]:
    tag = MODELS[model][3] + ("" if source == "fp32" else f"-{source}") + (
        f"-{tag}" if tag else "")
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
QUANT = ["--quantize", "int4"]
# key -> (label, lrc compress flags on the builder's fp32 folder)
VARIANTS = {
    "lrc-default": ("lrc's default int4 command, `--quantize int4` alone (recipe best: "
                    "`--target-size 1.2x` the model's int4 form, bits, blocks, correction ranks "
                    "and the head's form allocated by measured sensitivity; gptq, 4-bit A, int4 "
                    "embedding)", [*QUANT]),
    # the bare command's size given (a size given turns --update on): sequential, the same
    # choices; on Gemma (--model gemma3 --tag seq) not a win, so the bare command stays one-shot
    "lrc-default-seq": ("lrc's default int4 recipe with its size given, `--quantize int4 "
                        "--target-size 1.2x` (the same choices, each solved stage by stage on the "
                        "quantised model's own inputs: `--update`, the default with a size "
                        "given)", [*QUANT, "--target-size", "1.2x"]),
    "lrc-plain": ("lrc's plain int4 form of the builder's graph, no correction (`--quantize int4 "
                  "--embedding int4 --correct-rank 0`: round-to-nearest, block 32, the int4 "
                  "embedding shared with the head: the builder int4's recipe in lrc's writer)",
                  [*QUANT, "--embedding", "int4", "--correct-rank", "0"]),
    "lrc-q4c": ("lrc int4 + rank-32 correction, head 128 (float A, int8 embedding: the "
                "correction recipe of BENCHMARKS.md's quantisation section)",
                [*QUANT, "--correct-rank", "32,head=128"]),
    "lrc-q4c-compact": ("lrc int4 + rank-32 correction, head 64, 4-bit A, int4 embedding shared "
                        "with the head (`--correct-rank 32,head=64 --correct-a-bits 4 "
                        "--embedding int4`)",
                        [*QUANT, "--correct-rank", "32,head=64", "--correct-a-bits", "4",
                         "--embedding", "int4"]),
    "lrc-q4c-matched": ("lrc int4 at the builder's bytes: the correction's ranks allocated under "
                        "1.5 MB (`--correct-rank auto --correct-budget 1.5 --correct-a-bits 4 "
                        "--embedding int4`)",
                        [*QUANT, "--correct-rank", "auto", "--correct-budget", "1.5",
                         "--correct-a-bits", "4", "--embedding", "int4"]),
    "lrc-search": ("lrc int4, each block's scale searched against the input-weighted error, "
                   "no correction, int4 embedding shared with the head (`--base-quant search "
                   "--embedding int4`)",
                   [*QUANT, "--base-quant", "search", "--embedding", "int4"]),
    "lrc-search-compact": ("lrc int4, searched scales + rank-32 correction, head 64, 4-bit A, "
                           "int4 embedding shared (`--base-quant search --correct-rank "
                           "32,head=64 --correct-a-bits 4 --embedding int4`)",
                           [*QUANT, "--base-quant", "search", "--correct-rank", "32,head=64",
                            "--correct-a-bits", "4", "--embedding", "int4"]),
    "lrc-search-matched": ("lrc int4, searched scales, at the builder's bytes: the correction's "
                           "ranks allocated under 1.5 MB (`--base-quant search --correct-rank "
                           "auto --correct-budget 1.5 --correct-a-bits 4 --embedding int4`)",
                           [*QUANT, "--base-quant", "search", "--correct-rank", "auto",
                            "--correct-budget", "1.5", "--correct-a-bits", "4", "--embedding",
                            "int4"]),
    "lrc-gptq-compact": ("lrc int4 from GPTQ's codes (error feedback with the input's Gram, "
                         "damping 0.1, searched scales) + the compact correction "
                         "(`--base-quant gptq --correct-rank 32,head=64 --correct-a-bits 4 "
                         "--embedding int4`)",
                         [*QUANT, "--base-quant", "gptq", "--correct-rank", "32,head=64",
                          "--correct-a-bits", "4", "--embedding", "int4"]),
    "lrc-gptq-attn": ("lrc int4 from GPTQ's codes, the correction on attention's inputs and the "
                      "head only (`--base-quant gptq --correct-rank 32,head=64,ffn=0 "
                      "--correct-a-bits 4 --embedding int4`: half the X·A / Concat nodes)",
                      [*QUANT, "--base-quant", "gptq", "--correct-rank", "32,head=64,ffn=0",
                       "--correct-a-bits", "4", "--embedding", "int4"]),
    "lrc-gptq-attn-down": ("lrc int4 from GPTQ's codes, the correction on attention's inputs, "
                           "down's and the head (`--base-quant gptq --correct-rank "
                           "32,head=64,ffn.gate=0,ffn.up=0 --correct-a-bits 4 --embedding "
                           "int4`)",
                           [*QUANT, "--base-quant", "gptq", "--correct-rank",
                            "32,head=64,ffn.gate=0,ffn.up=0", "--correct-a-bits", "4",
                            "--embedding", "int4"]),
    "lrc-awq": ("lrc int4, AWQ's scaling alone (`--smooth auto`: s = a^α folded into the norms / "
                "up projections, α searched per input on the codes' output error), "
                "round-to-nearest codes, no correction, int4 embedding shared (`--smooth auto "
                "--embedding int4`)",
                [*QUANT, "--smooth", "auto", "--embedding", "int4"]),
    "lrc-awq-search": ("lrc int4, AWQ's scaling + searched scales, no correction: NNCF's AWQ + "
                       "scale estimation in lrc, with the head int4 (`--smooth auto "
                       "--base-quant search --embedding int4`)",
                       [*QUANT, "--smooth", "auto", "--base-quant", "search", "--embedding",
                        "int4"]),
    "lrc-awq-gptq-compact": ("lrc int4, AWQ's scaling + GPTQ's codes + the compact correction "
                             "(`--smooth auto --base-quant gptq --correct-rank 32,head=64 "
                             "--correct-a-bits 4 --embedding int4`)",
                             [*QUANT, "--smooth", "auto", "--base-quant", "gptq",
                              "--correct-rank", "32,head=64", "--correct-a-bits", "4",
                              "--embedding", "int4"]),
    # the one-shot correction (--no-update: the sequential one is the default with a size
    # given since 2026-12-05; the rows before ran one-shot by default): -seq for the other
    **{f"lrc-awq-size-{mb}": (f"lrc int4 in {mb} MB with AWQ's scaling first (`--smooth auto "
                              f"--target-size {mb} --no-update`; gptq, 4-bit A and the int4 "
                              f"embedding are target-size's defaults)",
                              [*QUANT, "--smooth", "auto", "--target-size", str(mb),
                               "--no-update"])
       for mb in (88, 105)},
    **{f"lrc-size-{mb}": (f"lrc int4 in {mb} MB of weights: bits, blocks and correction ranks "
                          f"allocated per group by measured sensitivity (`--base-quant gptq "
                          f"--correct-a-bits 4 --embedding int4 --target-size {mb} "
                          f"--no-update`)",
                          [*QUANT, "--base-quant", "gptq", "--correct-a-bits", "4",
                           "--embedding", "int4", "--target-size", str(mb), "--no-update"])
       for mb in (88, 97, 105)},
}
DECODE_TEXT = (
    " `--decode-budget X` (with `--target-size`; off unless given): the allocator also holds the "
    "weight MatMuls of one decoded token within X times the time of plain 4-bit codes in blocks "
    "of 32, predicted from per-node MatMulNBits times measured once on the machine "
    "(`lrc.runtime.decodecost`: a correction is its X·A node, its Concat and its rows, an 8-bit "
    "group twice the bytes); rows without it are bytes alone, as every `--target-size` row of "
    "the sections above.")
# --tag decode: the decode budget's section (its own folder and markers)
DECODE_VARIANTS = ("lrc-plain,lrc-size-88,lrc-size-88-d1.1,lrc-size-88-d1.05,lrc-size-97-d1.1,"
                   "lrc-default-d1.1")
SEQ_TEXT = (
    " `--update` with `--target-size` (the `-seq` rows; the default with a size given since "
    "2026-12-05, `--no-update` the one-shot rows): the allocator chooses on the original "
    "model, as without it (the same choices), then each choice is quantised and corrected stage "
    "by stage on the inputs the already quantised model produces, its target fitted to the "
    "original model's outputs (the sequential correction); the other rows correct each group "
    "once, on the original model's inputs.")
# --tag seq: target-size with the sequential correction (its own folder and markers)
SEQ_VARIANTS = ("lrc-plain,lrc-size-88,lrc-size-88-seq,lrc-size-88-d1.1,lrc-size-88-d1.1-seq,"
                "lrc-size-105-seq")
PREFILL_TEXT = (
    " `--prefill-budget X` (the `-pX` rows; off unless given): the same over a 128-token "
    "prompt, priced from the same machine's MatMulNBits times at 128 rows, where the kernels are "
    "bound by arithmetic: a correction's X·A node and Concat cost 9-23 % of its group's time, "
    "8-bit codes ~1.4x 4-bit ones, blocks of 64 / 128 3-13 % less than 32 (where the rows "
    "divide).")
# --tag prefill: target-size's prefill budget (its own folder and markers)
PREFILL_VARIANTS = ("lrc-plain,lrc-size-88-d1.1-seq,lrc-size-88-d1.1-p1-seq,"
                    "lrc-size-88-d1.1-p0.97-seq")
SCALES_TEXT = (
    " `--scales` (since 2026-12-05 float16 by default: the block scales stored in float16 and "
    "cast back to float32 in the graph, a Cast ONNX Runtime folds when it loads the model; the "
    "`-s32` rows float32, as the builder and ONNX Runtime's quantisers write them): a block of 32 "
    "4-bit codes takes 18 bytes on disk, not 20, and the bytes saved buy more 8-bit groups and "
    "corrections in the same size.")
# --tag scales: float16 scales on disk (its own folder and markers)
SCALES_VARIANTS = ("lrc-plain,lrc-plain-s32,lrc-size-88-d1.1-seq,lrc-size-88-d1.1-p1-seq,"
                   "lrc-size-105-seq")
CALIB_TEXT = (
    " Run with `--calib-tokens 32768` (twice the default): the Grams and the sequential stages' "
    "targets from twice the text (the sensitivity probe's two windows are the same); set against "
    "the 105 MB row of the float16 scales section (16384 tokens).")
# --tag calib: twice the calibration text (--calib-tokens 32768 given to the script)
CALIB_VARIANTS = "lrc-plain,lrc-size-105-seq"
TIME_TEXT = (
    " Where the compression time goes (t4 of issue 24: against NNCF's AWQ + scale estimation, "
    "the last line, from the peers section's run): under each allocated row its split, from "
    "`lrc.json` — choosing (each group's codes and errors at every block size and 8 bits, and "
    "beside them, in a worker thread, the sensitivity probe's runs of the model's tail with that "
    "group at its cheapest choice) and the sequential correction (the stages' segments run on "
    "the original and the quantised model, the sums of their Grams, each choice's solve: its "
    "fitted target, GPTQ's codes, the whitened correction). The one-shot row corrects each group "
    "once on the original model's statistics instead of the stages.")
# --tag time: the compression time and where it goes (one-shot against sequential)
TIME_VARIANTS = "lrc-plain,lrc-size-88-d1.1,lrc-size-88-d1.1-seq,lrc-size-105-seq"
TAGS = {"decode": (DECODE_VARIANTS, ": target-size's decode budget", DECODE_TEXT),
        "time": (TIME_VARIANTS, ": where the compression time goes",
                 TIME_TEXT + SCALES_TEXT + SEQ_TEXT + DECODE_TEXT),
        "calib": (CALIB_VARIANTS, ": twice the calibration text",
                  CALIB_TEXT + SCALES_TEXT + SEQ_TEXT),
        "scales": (SCALES_VARIANTS, ": block scales in float16 on disk",
                   SCALES_TEXT + SEQ_TEXT + DECODE_TEXT + PREFILL_TEXT),
        "prefill": (PREFILL_VARIANTS, ": target-size's prefill budget",
                    SEQ_TEXT + DECODE_TEXT + PREFILL_TEXT),
        "seq": (SEQ_VARIANTS, ": target-size with the sequential correction",
                SEQ_TEXT + DECODE_TEXT)}


def variant(key: str) -> tuple[str, list[str]]:
    """A variant by key; ``lrc-size-N`` / ``lrc-awq-size-N`` for any N (MB): the allocator there;
    a suffix ``-off`` / ``-dX``: its decode budget off / X; ``-pX``: its prefill budget X;
    ``-s32``: float32 scales; ``-seq``: the choices solved stage by stage (``--update``)."""
    if key in VARIANTS:
        return VARIANTS[key]
    if key.endswith("-seq"):
        label, args = variant(key[:-len("-seq")])
        return (f"{label.replace(' --no-update', '')}, each choice solved stage by stage on the "
                f"quantised model's own inputs (`--update`, the default with a size given)",
                [*[a for a in args if a != "--no-update"], "--update"])
    if key.endswith("-s32"):
        label, args = variant(key[:-len("-s32")])
        return (f"{label}, scales stored in float32 (`--scales float32`)",
                [*args, "--scales", "float32"])
    for suffix, flag in (("-p1", "1"), ("-p0.97", "0.97")):
        if key.endswith(suffix):
            label, args = variant(key[:-len(suffix)])
            return (f"{label}, prefill within {flag}x plain int4/32's (`--prefill-budget "
                    f"{flag}`)", [*args, "--prefill-budget", flag])
    for suffix, flag in (("-off", "off"), *((f"-d{x}", x) for x in ("1.05", "1.1", "1.2"))):
        if key.endswith(suffix):
            label, args = variant(key[:-len(suffix)])
            why = "bytes alone" if flag == "off" else f"decode within {flag}x plain int4/32's"
            return (f"{label}, {why} (`--decode-budget {flag}`)",
                    [*args, "--decode-budget", flag])
    for prefix in ("lrc-size-", "lrc-awq-size-"):
        if key not in VARIANTS and key.startswith(prefix) and key[len(prefix):].isdigit():
            mb, like = key[len(prefix):], VARIANTS[prefix + "88"]
            return like[0].replace("88", mb), [mb if a == "88" else a for a in like[1]]
    if key not in VARIANTS:
        raise SystemExit(f"unknown variant {key!r}: {', '.join(VARIANTS)} or lrc-[awq-]size-N")
    return VARIANTS[key]


def weight_shapes(source: Path) -> dict:
    """(inputs, outputs) of each MatMul / Gemm node's constant weight in ``source``'s graph,
    by node name (what lrc.json's allocation names its members by)."""
    import onnx

    g = onnx.load(str(Path(source) / "model.onnx"), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    out = {}
    for node in g.node:
        w = next((dims[i] for i in node.input[1:2] if i in dims and len(dims[i]) == 2), None)
        if w is not None and node.op_type in ("MatMul", "Gemm"):
            trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            out[node.name] = (w[1], w[0]) if trans else (w[0], w[1])
    return out


def decode_plans(models: dict, source: Path | None = None) -> dict:
    """Each lrc folder's plan (lrc.json): corrected and 8-bit groups, target-size's predicted
    decode time, and with ``source`` (the compressed graph) the multiply-adds its corrections
    add per token (r x (inputs + outputs) each) over the weight MatMuls' own: the share of
    prefill's arithmetic they add."""
    shapes = weight_shapes(source) if source is not None else {}
    out = {}
    for key, folder in models.items():
        f = Path(folder) / "lrc.json"
        if f.is_file():
            rec = json.loads(f.read_text())
            q = rec.get("quantize", {})
            alloc = q.get("allocation", [])
            choices = [a["choice"] for a in alloc]
            out[key] = {**(q.get("decode") or {}), "corrections": sum("+r" in c for c in choices),
                        "int8": sum(c.startswith("int8") for c in choices),
                        "wide_blocks": sum(c.split("+")[0] in ("int4/64", "int4/128")
                                           for c in choices),
                        "time": _time_split(rec)}
            if shapes and alloc and all(m in shapes for a in alloc for m in a["members"]):
                own = extra = 0
                for a in alloc:
                    k = shapes[a["members"][0]][0]
                    n = sum(shapes[m][1] for m in a["members"])
                    r = int(a["choice"].split("+r")[1]) if "+r" in a["choice"] else 0
                    own, extra = own + k * n, extra + r * (k + n)
                out[key]["macs_extra"] = extra / own
    return out


def _time_split(rec: dict) -> dict:
    """Where a compression's wall time went (lrc.json): in all, target-size's choosing (the
    choices' codes and errors, the sensitivity probes beside them) and the sequential
    correction's stages (segments run, sums, solves)."""
    cal = rec.get("calibration") or {}
    seq = {k[len("seconds_"):]: v for k, v in cal.items() if k.startswith("seconds_")}
    return {"total": (rec.get("seconds") or {}).get("total"),
            "plan": (rec.get("quantize") or {}).get("plan_seconds"), "sequential": seq}


def log(msg: str) -> None:
    print(f"[genai-builder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lrc(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "lrc.cli", *args], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        raise SystemExit(f"lrc {' '.join(args[:3])} ... failed: {(r.stderr or r.stdout)[-600:]}")
    return r.stdout


def model_bytes(path: Path) -> int:
    """The model's own files (.onnx and its external data), what --target-size counts."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and (
        p.suffix == ".onnx" or p.name.endswith((".onnx.data", ".onnx_data", ".data"))))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench-out/genai-builder (SmolLM2), bench-out/genai-builder-MODEL")
    ap.add_argument("--variants", default=None, help="default: every variant (with --tag: "
                    "the tag's)")
    ap.add_argument("--tag", choices=list(TAGS), default=None,
                    help="a section of its own (folder and markers): decode, the decode "
                    "budget's; seq, target-size with the sequential correction")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--reuse", action="store_true", help="keep compressed folders already there")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true",
                    help="render the section from OUT/results.json (nothing run)")
    ap.add_argument("--source", choices=["fp32", "fp16"], default="fp32",
                    help="the builder's folder lrc compresses (fp16: float16 weights, scales "
                         "and activations; its own section)")
    ap.add_argument("--load", default="", help="what else the machine ran meanwhile, said in "
                    "the section (with --render-only: added to OUT/results.json)")
    ap.add_argument("--note", default="", help="a sentence said after the section's text, e.g. "
                    "what changed since the run before (with --render-only: added to "
                    "OUT/results.json)")
    args = ap.parse_args(argv)
    if args.variants is None:
        args.variants = TAGS[args.tag][0] if args.tag else ",".join(VARIANTS)
    if args.out is None:
        args.out = ROOT / "bench-out" / (("genai-builder" if args.model == "smollm2"
                                          else f"genai-builder-{args.model}")
                                         + ("" if args.source == "fp32" else f"-{args.source}")
                                         + (f"-{args.tag}" if args.tag else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    mark_begin, mark_end = markers(args.model, args.source, args.tag or "")
    src = args.source
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
        src_dir = args.out / f"{args.model}-{src}"
        if src_dir.is_dir():  # the plans again from the folders (what lrc.json says)
            results["decode_plan"] = {**results.get("decode_plan", {}), **decode_plans(
                {k: args.out / k for k in results["args"]["variants"].split(",") if k
                 and (args.out / k).is_dir()}, src_dir)}
        if args.load or args.note:
            for k in ("load", "note"):
                if getattr(args, k):
                    results["args"][k] = getattr(args, k)
            (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        names = [f"builder-{results['args'].get('source', 'fp32')}", "builder-int4",
                 *[k for k in results["args"]["variants"].split(",") if k]]
        section = render(results, names)
        print(section)
        if args.write:
            write_section(ROOT / "BENCHMARKS.md", section, mark_begin, mark_end)
        return 0
    t0 = time.perf_counter()
    import builder

    m = args.model
    if builder.main([m, "--precision", src, "int4", "--out", str(args.out)]):
        raise SystemExit("the model builder failed")
    fp32, int4 = args.out / f"{m}-{src}", args.out / f"{m}-int4"
    dense = args.out / "dense"
    if not (dense / "model.onnx").is_file():
        source = MODELS[m][2] or str(builder.gguf_of(m))
        log(f"lrc export {Path(source).name} (optimum's graph: the dense reference)")
        lrc("export", source, "-o", str(dense), "--force", "--exporter", "optimum")
    keys = [k for k in args.variants.split(",") if k]
    compress_s = {}
    for key in keys:
        out = args.out / key
        if args.reuse and (out / "model.onnx").is_file():
            continue
        log(f"lrc compress {fp32.name} {' '.join(variant(key)[1])}")
        t = time.perf_counter()
        lrc("compress", str(fp32), *variant(key)[1], "--calib-tokens", str(args.calib_tokens),
            "-o", str(out), "--force")
        compress_s[key] = round(time.perf_counter() - t, 1)
    models = {f"builder-{src}": fp32, "builder-int4": int4, **{k: args.out / k for k in keys}}
    earlier = earlier_run(args.out / "results.json", args)
    log("lrc eval (news, docs)")
    ev = json.loads(lrc("eval", str(dense), *map(str, models.values()), "--max-tokens",
                        str(args.max_tokens), "--threads", "2", "--json"))
    # Two interleaved benches: the int4-class models (the builder's int4 first: the reference of
    # every paired ratio) apart from the float ones, whose 4x slower steps in one round-robin
    # moved the int4-class ratios by ~5 %; the builder's int4 runs in both, the link between them.
    bench_args = ("--seq", "128", "--decode-tokens", "32", "--runs", str(args.runs), "--warmup",
                  "3", "--threads", "2", "--json")
    log("lrc bench: the int4-class models (interleaved)")
    bench = json.loads(lrc("bench", str(int4), *[str(models[k]) for k in keys], *bench_args))
    log("lrc bench: the float models and the builder's int4 (interleaved)")
    bench_float = json.loads(lrc("bench", str(dense), str(fp32), str(int4), *bench_args))
    results = {"model": m, "date": time.strftime("%Y-%m-%d"), "machine": bench["machine"], "isa": isa_flags(),
               "eval": ev, "bench": bench, "bench_float": bench_float, "compress_s": compress_s,
               "decode_plan": decode_plans(models, fp32),
               "sizes": {k: folder_bytes(v) for k, v in {"dense": dense, **models}.items()},
               "model_bytes": {k: model_bytes(v) for k, v in {"dense": dense, **models}.items()},
               "args": vars(args) | {"out": str(args.out)},
               "seconds": round(time.perf_counter() - t0), "earlier": earlier}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    section = render(results, list(models))
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, mark_begin, mark_end)
        log("BENCHMARKS.md updated")
    return 0


def _paired(bench: dict, ref: str, name: str, phase: str, plain):
    """``ref``'s time over ``name``'s from the rounds timed back to back, with its 95 %
    interval (lrc.measure.bench.paired_speedup), when the bench kept its rounds; else the
    ratio of medians ``plain``."""
    from lrc.measure.bench import paired_speedup

    rounds = {r["model"]: r.get("rounds_ms") for r in bench["runs"] if r["phase"] == phase}
    if not rounds.get(ref) or not rounds.get(name) or ref == name:
        return plain
    p = paired_speedup(rounds[ref], rounds[name])
    return plain if p is None else (p["paired_speedup"], *p["speedup_ci95"])


def _placements(results: dict, names: list[str]) -> dict:
    """Each row's timing: name -> (its bench, its name there, the builder int4's name there).
    Since the split: the int4-class bench (builder int4 first, then lrc's) and the float one
    (dense, the builder's float, the builder's int4); before it, one bench of all."""
    if "bench_float" not in results:
        b = results["bench"]
        bn = [m["name"] for m in b["models"]]  # dense, builder float, builder int4, lrc's ...
        return {n: (b, bn[i + 1], bn[2]) for i, n in enumerate(names)}
    bi, bf = results["bench"], results["bench_float"]
    ni, nf = ([m["name"] for m in b["models"]] for b in (bi, bf))
    return {names[0]: (bf, nf[1], nf[2]),
            **{n: (bi, ni[j], ni[0]) for j, n in enumerate(names[1:])}}


def _speed(bench: dict, name: str) -> dict:
    """p50 ms per phase of one model of the bench result."""
    return {r["phase"]: r["p50_ms"] for r in bench["runs"] if r["model"] == name}


def row_values(results: dict, names: list[str]) -> dict:
    """Per row: perplexity on news and docs over dense's, KL on news, prefill and decode speed
    over the builder int4's (paired, with the interval, where the bench kept its rounds) and
    the compression time."""
    ev = results["eval"]
    d_news = ev["results"][0]["in_domain"]["orig"]["perplexity"]
    d_docs = ev["results"][0]["out_of_domain"]["orig"]["perplexity"]
    place = _placements(results, names)
    out = {}
    for i, name in enumerate(names):
        r = ev["results"][i]
        b, bname, bref = place[name]
        sp, rs = _speed(b, bname), _speed(b, bref)
        pre = rs.get("prefill") / sp["prefill"] if sp.get("prefill") else None
        dec = rs.get("decode") / sp["decode"] if sp.get("decode") else None
        out[name] = {"news": r["in_domain"]["new"]["perplexity"] / d_news,
                     "docs": r["out_of_domain"]["new"]["perplexity"] / d_docs,
                     "kl": r["in_domain"]["kl"],
                     "prefill": _paired(b, bref, bname, "prefill", pre),
                     "decode": _paired(b, bref, bname, "decode", dec),
                     "compress_s": results.get("compress_s", {}).get(name)}
    return out


def earlier_run(path: Path, args) -> dict | None:
    """The rows of the results.json a run replaces (the same model, source and tag): kept in
    the new one and shown beside it, the same script's run-to-run differences."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
        a = old["args"]
        if (old.get("model"), a.get("source", "fp32"), a.get("tag")) != (
                args.model, args.source, args.tag):
            return None
        src = a.get("source", "fp32")
        names = [f"builder-{src}", "builder-int4", *[k for k in a["variants"].split(",") if k]]
        return {"date": old.get("date"), "rows": row_values(old, names)}
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _earlier_cell(e: dict | None) -> str:
    if not e:
        return " - |"
    secs = f"{e['compress_s']:.0f} s" if e.get("compress_s") else "-"
    return (f" x{e['news']:.3f} / x{e['docs']:.3f}, {_ratio(e['prefill'])}, "
            f"{_ratio(e['decode'])}, {secs} |")


def _ratio(x) -> str:
    if isinstance(x, (tuple, list)):  # paired, with its 95 % interval (a list from JSON)
        return f"{x[0]:.2f} [{x[1]:.2f}-{x[2]:.2f}]"
    return "-" if x is None else f"{x:.2f}"


def render(results: dict, names: list[str]) -> str:
    bench = results["bench"]
    src = results["args"].get("source", "fp32")
    labels = {f"builder-{src}": f"ORT GenAI builder {src} (the same weights, fused)",
              "builder-int4": "ORT GenAI builder int4 (RTN, block 32, accuracy_level 4, "
                              "embedding shared int4)",
              **{k: variant(k)[0] for k in names if k not in (f"builder-{src}", "builder-int4")}}
    ref = _speed(*_placements(results, names)["builder-int4"][::2])  # the builder's int4
    dense_q = results["eval"]["results"][0]
    d_news = dense_q["in_domain"]["orig"]["perplexity"]
    d_docs = dense_q["out_of_domain"]["orig"]["perplexity"]
    size_ref = results["sizes"]["builder-int4"]
    earlier = results.get("earlier") or {}
    rows = [f"| dense (lrc export, optimum's graph) | {d_news:.2f} / {d_docs:.2f} | - | - | - | "
            f"{results['sizes']['dense'] / 1e6:.0f} MB |"]
    values = row_values(results, names)
    for name in names:
        v = values[name]
        size = results["sizes"][name]
        model_mb = results.get("model_bytes", {}).get(name)
        folder = Path(results["args"]["out"]) / name
        if model_mb is None and folder.is_dir():  # results written before the column existed
            model_mb = model_bytes(folder)
        secs = v["compress_s"]
        e = earlier.get("rows", {}).get(name)
        rows.append(f"| {labels.get(name, name)} | x{v['news']:.3f} / x{v['docs']:.3f} | "
                    f"{v['kl']:.3f} | {_ratio(v['prefill'])} | {_ratio(v['decode'])} | "
                    f"{size / 1e6:.1f} MB ({size / size_ref:.2f}x) | "
                    f"{f'{model_mb / 1e6:.1f} MB' if model_mb else '-'} | "
                    f"{f'{secs:.0f} s' if secs else '-'} |"
                    + (_earlier_cell(e) if earlier else ""))
    ref_ms = f"{ref.get('prefill', 0):.0f} ms prefill, {ref.get('decode', 0):.1f} ms per decoded token"
    s = results["bench"]["settings"]
    model = results.get("model", "smollm2")
    name, source = MODELS[model][:2]
    a = results["args"]
    tag = a.get("tag") or ""
    mark_begin, mark_end = markers(model, src, tag)
    flag = "" if model == "smollm2" else f" --model {model}"
    if src != "fp32":
        flag += f" --source {src}"
    if tag:
        flag += f" --tag {tag}"
    if a.get("variants") and a["variants"] != (TAGS[tag][0] if tag else ",".join(VARIANTS)):
        flag += f" --variants {a['variants']}"
    if a.get("calib_tokens") != 16384:
        flag += f" --calib-tokens {a['calib_tokens']}"
    title = ("" if model == "smollm2" else f", {name}") + (
        "" if src == "fp32" else f", from the builder's {src} graph") + (
        TAGS[tag][1] if tag else "")
    return "\n".join([
        mark_begin, "",
        f"## ONNX Runtime GenAI's model builder: its graphs, compressed by lrc{title}",
        "",
        f"`python benchmarks/genai_builder.py{flag}` ({results['date']}, "
        f"{results['seconds'] // 60} min). "
        f"{name} ({source}: every code here is symmetric, 4-bit in blocks of 32 (the "
        f"`lrc-size` and `lrc-default` rows: 4- or 8-bit in blocks of 32, 64 or 128, chosen "
        f"per group), none can "
        f"land on the source's grid); lrc compresses the builder's {src} folder "
        f"({results['args']['calib_tokens']} calibration tokens) and keeps its fused graph "
        + ("(GroupQueryAttention, skip-norms, packed QKV)" if src == "fp32" else
           "(the builder's CPU fp16 build: MultiHeadAttention after repeat_kv, RotaryEmbedding, "
           "skip-norms, Q/K/V apart; float16 weights, scales and activations)")
        + f"; perplexity on "
        f"{results['args']['max_tokens']} tokens of news and of Python docs (a domain absent "
        f"from calibration) as a ratio to the dense export's; KL(dense‖new) on news; speed from "
        + ("two interleaved `lrc bench` runs, the int4-class models (the builder's int4 and "
           "lrc's) in one and the float ones (dense, the builder's float, with the builder's "
           "int4 again as the link) in the other, since the float models' slower steps in one "
           "round-robin lowered the int4-class ratios (the decode budget section's 88 MB model, "
           "the same allocation both times: 0.92x in one bench of all, 0.94x alone with its "
           "class) "
           if "bench_float" in results else "one interleaved `lrc bench` ")
        + f"(medians of {s.get('runs')} runs, {s.get('threads')} "
        f"threads), relative to the builder's int4 ({ref_ms}"
        + ("; with the rounds kept: the median of the round-by-round ratios and its 95 % "
           "bootstrap interval" if any(r.get("rounds_ms") for r in bench["runs"]) else "")
        + f"); sizes of the folders (with "
        f"tokenizer and configs) and of the model files alone (.onnx + external data: what "
        f"`--target-size` counts); compression time in wall seconds on the machine "
        f"below (`-`: a folder an earlier run made, kept with `--reuse`)."
        + (f" Not a quiet run: {results['args']['load']}." if results["args"].get("load")
           else "") + (TAGS[tag][2] if tag else "")
        + (f" {results['args']['note']}" if results["args"].get("note") else ""),
        "",
        f"- Machine: {machine_line(results['machine'], results['isa'])}",
        "",
        "| model | ppl news / docs (x dense) | KL news | prefill s128 (x builder int4) | "
        "decode (x builder int4) | folder | model files | compress (this run) |"
        + (f" the run before ({earlier.get('date')}): ppl, prefill, decode, compress |"
           if earlier else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if earlier else ""),
        *rows,
        "",
        *_plan_lines(results, labels),
        *(_peer_time_lines(results, values) if tag == "time" else []),
        mark_end,
    ])


def _peer_time_lines(results: dict, values: dict) -> list[str]:
    """NNCF's data-aware rows (AWQ + scale estimation, and with its LoRA correction) from
    benchmarks/peers-MODEL.json (each row's last run: where and when) against each allocated
    row: time, and excess perplexity (x - 1) on both texts."""
    path = ROOT / "benchmarks" / f"peers-{results.get('model', 'smollm2')}.json"
    peers = json.loads(path.read_text()) if path.is_file() else {}
    lines = []
    for r in peers.get("rows", []):
        settings = r.get("settings") or {}
        if not (r["name"].startswith("NNCF") and settings.get("awq") and r.get("x_news")
                and r.get("compress_s")):
            continue
        subset = settings.get("lora_subset_size")
        what = "AWQ + scale estimation" + (" + LoRA correction" if settings.get(
            "lora_correction") else "") + (f" (LoRA on {subset} windows)" if subset else "")
        line = (f"- NNCF's {what} (`benchmarks/peers.py`, {r.get('date') or peers['date']}, "
                f"{r.get('machine') or peers['machine']}): x{r['x_news']:.3f} / "
                f"x{r['x_docs']:.3f} in {r['bytes'] / 1e6:.1f} MB, {r['compress_s']:.0f} s. "
                "Against it")
        parts = []
        for name, v in values.items():
            if not name.startswith("lrc-size") or not v.get("compress_s"):
                continue
            parts.append(f"`{name}` {v['compress_s'] / r['compress_s']:.1f}x its time, "
                         f"{(v['news'] - 1) / (r['x_news'] - 1):.2f}x / "
                         f"{(v['docs'] - 1) / (r['x_docs'] - 1):.2f}x its excess perplexity")
        lines.append(line + (": " + "; ".join(parts) if parts else "") + ".")
    return lines + [""] if lines else []


def _time_line(t: dict) -> str:
    """``; compress N s: ...`` from :func:`_time_split` (empty without the split)."""
    plan, seq = t.get("plan"), t.get("sequential") or {}
    if not t.get("total") or not plan:
        return ""
    out = (f"; compress {t['total']:.0f} s: choosing {plan['total']:.0f} s ({plan['codes']:.0f} s"
           f" of codes and errors, beside them {plan['probes']:.0f} s of {plan['probe_runs']} "
           f"sensitivity runs)")
    if seq.get("total"):
        out += (f", the sequential correction {seq['total']:.0f} s ({seq.get('forward', 0):.0f}"
                f" s running segments, {seq.get('gram', 0):.0f} s of sums, "
                f"{seq.get('factor', 0):.0f} s solving)")
    return out


def _plan_lines(results: dict, labels: dict) -> list[str]:
    """What each allocated variant planned: corrections, int8 groups, predicted MatMul time."""
    lines = []
    for key, p in results.get("decode_plan", {}).items():
        if not p.get("corrections") and not p.get("int8") and not p.get("plain_ms"):
            continue
        t = (f"; a decoded token's weight MatMuls predicted at "
             f"{p['planned_ms'] / p['plain_ms']:.3f}x plain int4/32's ({p['planned_ms']:.2f} of "
             f"{p['plain_ms']:.2f} ms; budget {p['budget']:g}x"
             f"{', binding' if p.get('priced') else ''})"
             if p.get("plain_ms") and p.get("budget") else "; no decode budget")
        pre = p.get("prefill") or {}
        if pre.get("budget"):
            t += (f"; a {pre['tokens']}-token prompt's at "
                  f"{pre['planned_ms'] / pre['plain_ms']:.3f}x ({pre['planned_ms']:.1f} of "
                  f"{pre['plain_ms']:.1f} ms; budget {pre['budget']:g}x"
                  f"{', binding' if pre.get('priced') else ''})")
        wide = (f", {p['wide_blocks']} in blocks of 64 / 128" if p.get("wide_blocks") else "")
        macs = (f"; its corrections add {p['macs_extra']:.1%} to the weight MatMuls' "
                f"multiply-adds per token" if p.get("macs_extra") is not None else "")
        lines.append(f"- `{key}`: {p['corrections']} corrected groups, {p['int8']} in 8 bits"
                     f"{wide}{macs}{t}{_time_line(p.get('time') or {})}.")
    return lines + ([""] if lines else [])


if __name__ == "__main__":
    sys.exit(main())
