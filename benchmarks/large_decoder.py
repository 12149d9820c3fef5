"""A 0.5B decoder above 2 GB, end to end: exported by optimum and by ONNX Runtime GenAI's model
builder, compressed by lrc to int4 + correction, the outputs loaded in ONNX Runtime and ORT GenAI.

The shape of the 0.5B model on which ``lrc compress --quantize int4 --correct-rank 32`` once
stopped after an hour (a Constant whose value lived in the input's external data, not carried
into the output): Qwen2, hidden 896, 24 layers, FFN 4864, 14 heads / 2 KV heads, vocabulary
151936, untied head, ~2.5 GB in float32. Random weights (transformers builds the model from a
config, no download) and a byte-level BPE tokenizer made here (256 byte tokens): the point is
the size and the graph, not the text. For each exporter the script

1. exports (optimum through ``lrc export``; the builder in its own environment,
   benchmarks/builder.py's, ``-p fp32 -e cpu``);
2. compresses with ``lrc compress --quantize int4 --correct-rank 32`` (a small calibration:
   the weights are random), timing it and the peak memory of the process;
3. loads the output in ONNX Runtime (``lrc generate``, greedy) and in ORT GenAI (greedy from
   the same prompt ids) and checks the two give the same tokens.

    python benchmarks/large_decoder.py [--exporters optimum,builder] [--calib-tokens 512] [--write]

Results in OUT/results.json; one line per exporter on stdout; ``--write`` puts a section into
BENCHMARKS.md between ``<!-- large-decoder:begin -->`` and ``<!-- large-decoder:end -->``. Needs ~10 GB of memory (optimum's
export peaks near 6 GB) and ~15 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MARK_BEGIN, MARK_END = "<!-- large-decoder:begin -->", "<!-- large-decoder:end -->"

SHAPE = dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
             max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=False)
SMOKE = dict(SHAPE, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)  # --smoke: the path
PROMPT_IDS = [1, 65, 66, 67, 32, 100, 101, 102]
NEW = 6


def log(msg: str) -> None:
    print(f"[large-decoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """Run a command; its stdout, seconds and the peak RSS (GB) of the children so far."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))} ... failed: {(r.stderr or r.stdout)[-1500:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    return r.stdout, time.perf_counter() - t, peak


def byte_tokenizer():
    """A byte-level BPE tokenizer with 256 byte tokens and no merges, plus BOS / EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|bos|>": 0, "<|eos|>": 1} | {ch: i + 2 for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                   eos_token="<|eos|>")


def hf_folder(dest: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape, bos_token_id=0, eos_token_id=1)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(dest)
    byte_tokenizer().save_pretrained(dest)


def og_greedy(folder: Path) -> list[int]:
    from lrc.generate import genai_generate

    return genai_generate(folder, PROMPT_IDS, max_new_tokens=NEW).new_token_ids


def lrc_greedy(folder: Path) -> list[int]:
    from lrc.generate import OnnxCausalLM

    lm = OnnxCausalLM(folder, threads=2)
    return lm.generate("", max_new_tokens=NEW, prompt_ids=PROMPT_IDS).new_token_ids


def folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "large-decoder")
    ap.add_argument("--exporters", default="optimum,builder")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model of the same family (the script's path in a minute)")
    ap.add_argument("--reuse", action="store_true", help="keep exports / outputs already there")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true",
                    help="render the section from OUT/results.json (nothing run)")
    args = ap.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
        if "machine" not in results:  # a run by an older version of this script
            results["machine"] = _machine() + " (where the section was rendered, after the run)"
        return _section(results, args.write)
    out = args.out / "smoke" if args.smoke else args.out
    shape = SMOKE if args.smoke else SHAPE
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "qwen2-hf"
    if not (hf / "config.json").is_file():
        log("random-weight Qwen2 of the 0.5B shape")
        hf_folder(hf, shape)
    results = {"date": time.strftime("%Y-%m-%d"), "shape": shape, "exporters": {}}
    for exporter in [e for e in args.exporters.split(",") if e]:
        src = out / f"{exporter}-fp32"
        row = results["exporters"].setdefault(exporter, {})
        if not (args.reuse and (src / "model.onnx").is_file()):
            log(f"export by {exporter}")
            if exporter == "optimum":
                _, secs, _ = run([sys.executable, "-m", "lrc.cli", "export", str(hf), "-o",
                                  str(src), "--force", "--exporter", "optimum"])
            else:
                import builder

                py = builder.venv_python()
                _, secs, _ = run([str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                                  "-o", str(src), "-p", "fp32", "-e", "cpu", "-c",
                                  str(out / "cache")], env={"TRANSFORMERS_OFFLINE": "1"})
            row["export_s"] = round(secs)
        row["input_gb"] = round(folder_gb(src), 2)
        q4 = out / f"{exporter}-q4c"
        if not (args.reuse and (q4 / "model.onnx").is_file()):
            log(f"compress {src.name} --quantize int4 --correct-rank 32")
            _, secs, peak = run([sys.executable, "-m", "lrc.cli", "compress", str(src),
                                 "--quantize", "int4", "--correct-rank", "32", "--calib-tokens",
                                 str(args.calib_tokens), "-o", str(q4), "--force"])
            row |= {"compress_s": round(secs), "peak_rss_gb_so_far": round(peak, 2)}
        row["output_gb"] = round(folder_gb(q4), 2)
        rep = json.loads((q4 / "lrc.json").read_text())
        row["quantized_nodes"] = len(rep.get("quantize", {}).get("nodes", []))
        row["checks"] = rep.get("checks")
        log(f"greedy tokens of {q4.name}: ONNX Runtime, ORT GenAI")
        row["ort_tokens"] = lrc_greedy(q4)
        row["genai_tokens"] = og_greedy(q4)
        row["same_tokens"] = row["ort_tokens"] == row["genai_tokens"]
        print(json.dumps({exporter: row}), flush=True)
    results["machine"] = _machine()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.smoke:
        _section(results, args.write)
    bad = [e for e, r in results["exporters"].items() if not r.get("same_tokens")]
    if bad:
        print(f"ORT and ORT GenAI disagree on {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def _machine() -> str:
    from quant import isa_flags, machine_line

    from lrc.measure.machine import machine_info

    return machine_line(machine_info(), isa_flags())


def _section(results: dict, write: bool) -> int:
    rows = []
    for exporter, r in results["exporters"].items():
        rows.append(f"| {exporter} | {r.get('export_s', '-')} s | {r['input_gb']:.2f} GB | "
                    f"{r.get('compress_s', '-')} s | {r['output_gb']:.2f} GB | "
                    f"{r['quantized_nodes']} | {', '.join(f'{k} {v}' for k, v in (r.get('checks') or {}).items() if k in ('checker', 'shape_inference', 'ort_cpu_session'))} | "
                    f"{'yes' if r['same_tokens'] else 'NO'} |")
    sh = results["shape"]
    section = "\n".join([
        MARK_BEGIN, "",
        "## A 0.5B decoder above 2 GB, end to end",
        "",
        f"`python benchmarks/large_decoder.py` ({results['date']}). A random-weight Qwen2 of the "
        f"shape lrc once failed on after an hour (hidden {sh['hidden_size']}, "
        f"{sh['num_hidden_layers']} layers, FFN {sh['intermediate_size']}, vocabulary "
        f"{sh['vocab_size']}, untied head), exported by optimum (`lrc export --exporter optimum`) and by ONNX "
        "Runtime GenAI's model builder (fp32), each compressed with `lrc compress --quantize "
        "int4 --correct-rank 32` (a small calibration: the weights are random); the outputs "
        "loaded in ONNX Runtime (`lrc generate`) and in ORT GenAI, greedy from the same ids. "
        "Times on a busy machine (other jobs beside it), for the record, not for comparison.",
        "",
        f"- Machine: {results.get('machine', '-')}",
        "",
        "| exporter | export | input | compress | output | quantised MatMuls | checks | "
        "ORT = ORT GenAI tokens |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        MARK_END,
    ])
    print(section)
    if write:
        from quant import write_section

        write_section(ROOT / "BENCHMARKS.md", section, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
