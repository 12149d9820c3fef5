"""Export Hugging Face / GGUF models to ONNX folders that ONNX Runtime (and optimum) can load.

Who exports (``exporter="auto"``, :func:`auto_choice`): a decoder LM with its KV cache goes to
ONNX Runtime GenAI's model builder (:mod:`lrc.exporters.builder`: the fused graph ORT GenAI
deploys), checked against PyTorch by the ``check`` the caller passes (``lrc export`` passes
:func:`lrc.measure.exported.agreement`; this layer runs no sessions); everything else, and any
decoder the builder cannot build or builds wrong, goes to optimum, with the reason in
``ExportResult.fallback_reason``.

Why optimum for the rest: its exporter knows, per architecture, how to export decoders *with* a KV cache
(``past_key_values.N.key/value`` in, ``present.N.key/value`` out, dynamic batch / sequence /
past axes), validates the ONNX outputs against PyTorch, and writes the folder layout that
``optimum.onnxruntime.ORTModelFor*`` loads (model.onnx, config.json, generation_config.json,
tokenizer files).  optimum-onnx 0.1.0 pins transformers<4.58, which still reads GGUF files and
``save_pretrained``-s the result, so a GGUF source is first converted to a temporary HF folder.

Fallback: ``torch.onnx.export(dynamo=True, opset 18)`` is used only when optimum cannot export
a model (an architecture it has no ONNX config for, or an exporter error).  It exports the plain
forward pass (``input_ids, attention_mask -> logits | last_hidden_state``) with dynamic batch
and sequence axes but *without* a KV cache: writing the cache plumbing by hand per family is
what optimum exists for, so a decoder exported this way is generated from by recomputing the
whole sequence each step (``lrc.generate`` handles both layouts).

A decoder folder also gets ONNX Runtime GenAI's ``genai_config.json``, written from the exported
graph by :mod:`lrc.graph.genai` (``ExportResult.genai`` says what was done, or why not). A GGUF
source's tokenizer.json gets the plain ``ByteLevel`` decoder its SentencePiece-style one amounts
to (:func:`lrc.graph.genai.byte_level_decoder`: the same text from every id, and GenAI's
tokenizer reads it right).

GGUF tokenizers: a SentencePiece-style vocabulary (Gemma, Llama-2: ``tokenizer.ggml.model ==
"llama"`` without merges) gets lrc's own tokenizer.json (transformers 4.57 reads it as Unigram
and fragments words), and every GGUF export checks the written tokenizer.json against a
reference tokenizer of the GGUF's vocabulary before the folder appears
(:mod:`lrc.exporters.gguf_tokenizer`; a difference fails the export in one line). A head that
holds a copy of the tied embedding table is rewritten to read the table
(:mod:`lrc.graph.passes.tied`), so the folder stores it once. ``lrc.json`` in the folder
records both (``{"export": {"tokenizer": ..., "tied": ...}}``), as do ``ExportResult.tokenizer``
and ``.tied``.

Writes are atomic: everything goes into a hidden temporary folder beside ``out_dir`` that is
renamed into place at the end, so an interrupted export never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Offline by design: set before transformers / optimum / huggingface_hub are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from lrc.errors import LrcError, opt
from lrc.graph.model import staging_dir  # noqa: E402
from lrc.graph import genai  # noqa: E402
from lrc.graph.folder import replace  # noqa: E402
from lrc.modelref import model_files, pick_file  # noqa: E402
from lrc.exporters.gguf_tokenizer import GGUFVocab, check_tokenizer, prepare  # noqa: E402
from lrc.exporters.sources import KIND_GGUF, read_config, resolve_source  # noqa: E402

log = logging.getLogger(__name__)

#: Tasks lrc exports.  Encoder-decoder models (T5, BART...) use the text2text ones and give
#: ``encoder_model.onnx`` + ``decoder_model*.onnx`` instead of one ``model.onnx``.
TASKS = (
    "text-generation-with-past",
    "text-generation",
    "feature-extraction",
    "text2text-generation-with-past",
    "text2text-generation",
)

EXPORTERS = ("auto", "optimum", "torch-dynamo", "builder")

# Files a tokenizer may consist of; copied from the source when the exporter did not write them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class ExportResult:
    """What :func:`export` produced."""

    out_dir: Path
    model_path: Path  # model.onnx, or the decoder file of an encoder-decoder export
    task: str
    exporter: str  # "optimum", "torch-dynamo" or "builder"
    seconds: float
    files: list[Path] = field(default_factory=list)  # every .onnx file written
    fallback_reason: str | None = None  # why auto's first choice was not used, when it was not
    genai: dict = field(default_factory=dict)  # lrc.graph.genai.write_config's report
    tokenizer: str | None = None  # what was done to / checked of a GGUF source's tokenizer
    tied: dict = field(default_factory=dict)  # file -> ShareTiedEmbedding's record, where it acted
    builder: dict = field(default_factory=dict)  # the builder's version, precision, options
    converted: dict = field(default_factory=dict)  # float16 after optimum / dynamo: how, seconds


def find_onnx_files(directory: str | Path) -> list[Path]:
    """The ``.onnx`` files directly inside ``directory`` (:func:`lrc.modelref.model_files`);
    ``model.onnx`` first, then by name."""
    return sorted(model_files(directory), key=lambda p: (p.name != "model.onnx", p.name))


def infer_task(config: dict) -> str:
    """Pick the export task from a model's ``config.json`` contents."""
    if config.get("is_encoder_decoder"):
        return "text2text-generation-with-past"
    archs = config.get("architectures") or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "text-generation-with-past"
    if not archs and config.get("model_type") in {
        "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt",
    }:
        return "text-generation-with-past"
    return "feature-extraction"


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise LrcError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            raise LrcError(f"{out} exists and is not empty; pass {opt('force')} to replace it")


def _gguf_to_hf_folder(gguf: Path, dest: Path) -> tuple[GGUFVocab, str]:
    """Dequantise a GGUF model to float32 and ``save_pretrained`` it (+ tokenizer) into ``dest``.
    A SentencePiece-style vocabulary gets lrc's tokenizer.json (:mod:`lrc.exporters.gguf_tokenizer`:
    transformers 4.57 makes a Unigram model of it); returns the GGUF's vocabulary and what was
    done to the tokenizer, for :func:`check_tokenizer` once the folder is written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # gguf / accelerate missing
        raise LrcError(f"reading {gguf.name} needs the export extra: pip install 'lrc[export]' ({e})") from e
    except (ValueError, KeyError, RuntimeError) as e:
        raise LrcError(f"transformers cannot load {gguf.name}: {str(e).splitlines()[0]}") from e
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    vocab, how = prepare(gguf, dest)
    _byte_level_tokenizer(dest / "tokenizer.json")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dest)
    return vocab, how


def _byte_level_tokenizer(path: Path) -> None:
    """Give a GGUF-converted byte-level BPE tokenizer.json the plain ByteLevel decoder its
    SentencePiece-style one amounts to (see the module docstring)."""
    if not path.is_file():
        return
    fixed = genai.byte_level_decoder(json.loads(path.read_text(encoding="utf-8")))
    if fixed is not None:
        path.write_text(json.dumps(fixed, ensure_ascii=False, indent=2), encoding="utf-8")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the source's tokenizer files verbatim, over any the exporter re-saved.

    optimum re-saves the tokenizer through AutoTokenizer, which can change it (a folder with
    only tokenizer.json is loaded as the model type's tokenizer class, which may add tokens);
    the files the model came with are the ground truth.  Files only the exporter wrote (e.g. a
    tokenizer.json converted from a sentencepiece model) are kept.
    """
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _export_optimum(hf_dir: Path, out: Path, task: str, opset: int | None, validate: bool) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(hf_dir),
        output=out,
        task=task,
        opset=opset,
        device="cpu",
        local_files_only=True,
        do_validation=validate,
        library_name="transformers",
    )


class _PlainForward:
    """Builds a torch module whose forward returns one tensor, for torch.onnx.export."""

    @staticmethod
    def build(hf_dir: Path, task: str):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        causal = task.startswith("text-generation")
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model.config.use_cache = False

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                return out.logits if causal else out.last_hidden_state

        return Wrapper(model).eval(), model, ("logits" if causal else "last_hidden_state")


def _export_dynamo(hf_dir: Path, out: Path, task: str, opset: int | None) -> str:
    """Export the plain forward pass with torch.onnx's dynamo exporter; returns the task done."""
    import torch

    if task.startswith("text2text"):
        raise LrcError("the torch-dynamo fallback does not export encoder-decoder models")
    if task == "text-generation-with-past":
        task = "text-generation"  # no KV cache in the fallback (see module docstring)
    wrapper, model, out_name = _PlainForward.build(hf_dir, task)
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask),
            str(out / "model.onnx"),
            dynamo=True,
            opset_version=opset or 18,
            input_names=["input_ids", "attention_mask"],
            output_names=[out_name],
            dynamic_shapes=dyn,
            external_data=False if _param_bytes(model) < 1.8e9 else True,
        )
    model.config.save_pretrained(out)
    if task.startswith("text-generation") and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return task


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export(
    source: str | Path,
    out_dir: str | Path,
    task: str | None = None,
    opset: int | None = None,
    force: bool = False,
    *,
    exporter: str = "auto",
    validate: bool = True,
    quiet: bool = True,
    dtype: str = "float32",
    check=None,
    convert=None,
) -> ExportResult:
    """Export ``source`` (HF folder, .gguf file, or alias) to an ONNX folder ``out_dir``.

    ``task`` defaults to one inferred from config.json (see :func:`infer_task`).  ``exporter``
    is ``"auto"`` (see :func:`auto_choice`: the builder for a decoder LM with a KV cache, else
    optimum; optimum when the builder cannot, torch-dynamo when optimum cannot), ``"optimum"``,
    ``"torch-dynamo"`` or ``"builder"`` (ONNX Runtime GenAI's model builder, decoder LMs only:
    :mod:`lrc.exporters.builder`).  ``dtype`` is the builder's precision (float32, float16, or
    int4: its own round-to-nearest codes, a baseline); the other exporters write float32 (the
    CLI converts to float16 after them; int4 is the builder's only).  ``validate`` runs the
    exporter's ONNX-vs-PyTorch output check: optimum's own, and for the builder's graph
    ``check(hf_dir, staged_folder, precision) -> dict`` (lrc's is
    :func:`lrc.measure.exported.agreement`, which ``lrc export`` passes: this layer runs no
    sessions), on the staged folder before it appears; an LrcError from it with ``"auto"``
    means optimum exports instead. ``convert(files)`` makes float16 what optimum or dynamo wrote
    in float32 when ``dtype`` is float16 (``lrc export`` passes :func:`lrc.quantize.to_float16`,
    which sits above this layer), on the staged files, before the folder appears.
    ``quiet`` hides the tracer / deprecation warnings torch and transformers print while
    exporting (optimum's own log messages, e.g. validation results, still show).
    """
    if task is not None and task not in TASKS:
        raise LrcError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if exporter not in EXPORTERS:
        raise LrcError(f"unknown exporter '{exporter}'; choose one of: {', '.join(EXPORTERS)}")
    if dtype not in ("float32", "fp32") and exporter not in ("builder", "auto") and not (
            dtype in ("float16", "fp16") and convert is not None):
        raise LrcError(f"--dtype {dtype} at export time is the builder's (--exporter builder); "
                       "other exporters write float32")
    path, kind = resolve_source(source)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(quiet):
        return _export(path, kind, out, task, opset, exporter, validate, dtype,
                       check if validate else None, convert)


def auto_choice(config: dict, task: str, opset: int | None) -> tuple[str, str]:
    """``(exporter, why)`` of ``--exporter auto`` before anything runs: the builder for a decoder
    LM exported with its KV cache (the fused graph ONNX Runtime GenAI deploys: one
    GroupQueryAttention per layer, skip-norms, packed QKV), optimum for everything else — an
    encoder, an encoder-decoder, a decoder without cache (``--task text-generation``), an
    ``--opset`` (the builder picks its own), no onnxruntime-genai, or a config the builder
    would build wrong (:func:`lrc.exporters.builder.check`). ``why`` is empty for the builder."""
    import importlib.util

    from lrc.exporters.builder import check

    if task != "text-generation-with-past":
        return "optimum", ""
    if opset is not None:
        return "optimum", f"{opt('opset')} {opset} asked (the builder chooses its own)"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "optimum", "onnxruntime-genai is not installed (pip install 'lrc[export]')"
    try:
        check(config)
    except LrcError as e:
        return "optimum", re.split(r"[;:] use ", str(e))[0]
    return "builder", ""


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    # optimum's validation logs one line per output (60+ for a KV-cache decoder) as warnings
    # even when every difference is within tolerance; a failed validation still raises.
    logs = [logging.getLogger(n) for n in ("transformers", "optimum", "optimum.exporters.onnx",
                                            "optimum.exporters.onnx.convert")]
    levels = [lg.level for lg in logs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in logs:
            lg.setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as tf_logging

            tf_logging.disable_progress_bar()  # "Converting and de-quantizing GGUF tensors"
        except ImportError:
            tf_logging = None
        try:
            yield
        finally:
            if tf_logging is not None:
                tf_logging.enable_progress_bar()
            for lg, level in zip(logs, levels):
                lg.setLevel(level)


def _export(path: Path, kind: str, out: Path, task: str | None, opset: int | None,
            exporter: str, validate: bool, dtype: str = "float32", check=None,
            convert=None) -> ExportResult:
    t0 = time.perf_counter()
    tmp = staging_dir(out)  # .OUT.tmp-PID-*: a killed run's is removed by the next
    scratch: tempfile.TemporaryDirectory | None = None
    try:
        vocab = tokenizer_note = None
        if kind == KIND_GGUF:
            scratch = tempfile.TemporaryDirectory(prefix="lrc-gguf-")
            hf_dir = Path(scratch.name)
            vocab, tokenizer_note = _gguf_to_hf_folder(path, hf_dir)
        else:
            hf_dir = path
        config = read_config(hf_dir)
        task = task or infer_task(config)

        used, reason, built = exporter, None, None
        if exporter == "auto":
            used, reason = auto_choice(config, task, opset)
        if used == "builder":
            if not task.startswith("text-generation"):
                raise LrcError(f"the builder exports decoder LMs; {path.name} is {task}: use "
                               f"{opt('exporter')} optimum")
            from lrc.exporters.builder import build
            from lrc.exporters.builder import check as check_config

            try:
                if exporter == "builder":  # auto_choice has checked it already
                    check_config(config)
                with tempfile.TemporaryDirectory(prefix="lrc-builder-") as cache:
                    built = build(hf_dir, tmp, dtype, Path(cache))
                if check is not None:
                    built["agreement"] = check(hf_dir, tmp, built["precision"])
                task = "text-generation-with-past"
            except LrcError as e:
                if exporter == "builder":
                    raise
                reason, built, used = f"the builder: {e}", None, "optimum"
                log.warning("%s; exporting with optimum", reason)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        if used != "builder" and dtype not in ("float32", "fp32"):
            if dtype not in ("float16", "fp16"):
                raise LrcError(f"--dtype {dtype} is the builder's own, and {path.name} is not "
                               f"exported by it ({reason or task})")
            if convert is None:
                raise LrcError(f"--dtype {dtype} after {used}'s export needs a float16 converter "
                               "(export(..., convert=lrc.quantize.to_float16); lrc export passes it)")
        if used in ("auto", "optimum"):
            try:
                _export_optimum(hf_dir, tmp, task, opset, validate)
                used = "optimum"
            except LrcError:
                raise
            except Exception as e:  # noqa: BLE001 - any exporter failure may be retried
                if exporter == "optimum":
                    raise LrcError(f"optimum could not export {path.name}: {_one_line(e)}") from e
                reason = f"{reason}; optimum: {_one_line(e)}" if reason else _one_line(e)
                log.warning("optimum export failed (%s); falling back to torch.onnx dynamo", reason)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                used = "torch-dynamo"
        if used == "torch-dynamo":
            try:
                task = _export_dynamo(hf_dir, tmp, task, opset)
            except LrcError:
                raise
            except Exception as e:  # noqa: BLE001
                msg = f"torch-dynamo export of {path.name} failed: {_one_line(e)}"
                if reason:
                    msg += f" (before it: {reason})"
                raise LrcError(msg) from e

        _copy_tokenizer_files(hf_dir, tmp)
        if vocab is not None:
            tokenizer_note = _check_gguf_tokenizer(tmp / "tokenizer.json", vocab, tokenizer_note)
        files = find_onnx_files(tmp)
        if not files:
            raise LrcError(f"the exporter wrote no .onnx file for {path.name}")
        if built is None:
            tied = _share_tied_embeddings(files)
            described = genai.write_config(tmp)
            if described["file"] is None and task.startswith("text-generation"):
                log.info("no %s: %s", genai.CONFIG, described["reason"])
        else:  # the builder's own layout and genai_config.json, as ORT GenAI gets them
            tied = {}
            described = {"file": genai.CONFIG, "by": "builder"}
        converted = None
        if built is None and dtype in ("float16", "fp16"):
            t1 = time.perf_counter()
            convert([f for f in files if f.suffix == ".onnx"])
            converted = {"float16": "ONNX Runtime's converter (inputs and outputs kept float32)",
                         "seconds": round(time.perf_counter() - t1, 1)}
        _write_record(tmp, source=path, exporter=used, task=task, tokenizer=tokenizer_note, tied=tied,
                      **({"builder": built} if built else {}),
                      **({"converted": converted} if converted else {}))
        replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()

    files = find_onnx_files(out)
    return ExportResult(
        out_dir=out,
        model_path=pick_file(out),
        task=task,
        exporter=used,
        seconds=time.perf_counter() - t0,
        files=files,
        fallback_reason=reason or None,
        genai=described,
        tokenizer=tokenizer_note,
        tied=tied,
        builder=built or {},
        converted=converted or {},
    )


def _check_gguf_tokenizer(path: Path, vocab: GGUFVocab, done: str) -> str:
    """Check the folder's tokenizer.json against the GGUF vocabulary (LrcError on a difference);
    returns what was done, in words."""
    if not path.is_file():
        raise LrcError(f"the export of {vocab.source} wrote no tokenizer.json")
    res = check_tokenizer(path, vocab)
    if not res["checked"]:
        return f"{done}; {res['note']}"
    return f"{done}, checked on {res['chars']} chars" + (f" ({res['note']})" if res["note"] else "")


def _share_tied_embeddings(files: list[Path]) -> dict:
    """Store a tied embedding once in every exported file (:mod:`lrc.graph.passes.tied`)."""
    from lrc.graph import model as M
    from lrc.graph.passes.tied import ShareTiedEmbedding

    done = {}
    for f in files:
        model = M.load(f)
        tied = ShareTiedEmbedding()
        if not tied(model).modified:
            continue
        before = M.external_files(f)
        M.save(model, f, force=True)
        del model
        for name in before - M.external_files(f):  # a data file the new layout no longer names
            (f.parent / name).unlink(missing_ok=True)
        done[f.name] = tied.record
    return done


RECORD = "lrc.json"


def _write_record(folder: Path, **what) -> None:
    """``lrc.json`` of an exported folder: ``{"export": {...}}`` (source, exporter, task, what
    was done to the tokenizer and to a tied embedding)."""
    from lrc.graph.model import write_text_atomic

    what["source"] = str(what["source"])
    write_text_atomic(folder / RECORD, json.dumps({"export": what}, indent=1))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
