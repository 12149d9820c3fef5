"""Folder in, folder out: the one implementation every command that rewrites a model folder uses.

An exported model folder holds one or more ``*.onnx`` files (with their external data) beside
the files a runtime needs to use them (tokenizer, configs, chat template). A job that rewrites
the models (compress, quantize, tune's candidates) must:

1. refuse an output that exists (unless forced), whose parent is missing, or that is the input;
2. validate every model before writing anything;
3. build the new folder in a temporary folder beside the output: the auxiliary files copied,
   each model transformed by the job's callback, a summary written;
4. rename it into place only when complete, so a failure leaves nothing behind.

``transform_folder`` does all four; ``staged_folder`` is steps 1-2 and 4 around a block of the
caller's own, and ``copy_aux`` / ``replace`` are the pieces, for a job (tune) that builds many
candidate folders and moves one of them into place.

A folder ``transform_folder`` writes also gets ONNX Runtime GenAI's ``genai_config.json`` when its
model is a decoder (:mod:`lrc.graph.genai`, from the rewritten graph); the report of the model
it names says what was done, or why no config was written.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lrc.errors import LrcError
from lrc import modelref
from lrc.graph import genai, model
from lrc.graph.model import external_files, load_proto

Transform = Callable[[Path, Path], dict]  # (source model file, where to write it) -> report
# what a killed lrc leaves beside an output (``stage``'s and ``replace``'s temporary names):
# never copied into a new folder
_LEFTOVERS = (".*.tmp-*", ".*.old-*")


def model_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.onnx`` in ``folder`` (:func:`lrc.modelref.model_files`); LrcError if there is
    none."""
    files = modelref.model_files(folder)
    if not files:
        raise LrcError(f"{folder}: folder holds no .onnx model")
    return files


def check_output(src: Path, out: Path, force: bool) -> None:
    """The output may be written: absent (or ``force``), its parent exists, neither the input
    nor inside it (it would be copied into later outputs), nor a folder holding the input
    (``--force`` would delete the input with it)."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise LrcError("output must differ from the input")
    if s in o.parents:
        raise LrcError(f"output {out} lies inside the input folder {src}: write it elsewhere")
    if o in s.parents:
        raise LrcError(f"output {out} holds the input folder {src}: write it elsewhere")
    model.check_output(out, force)


def copy_aux(src_dir: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Copy everything in ``src_dir`` but its models, their external data and the names matching
    a pattern in ``skip`` (a job's own summary files, e.g. ``"*.lrc.json"``) into ``dst``
    (created); sub-folders are copied whole."""
    dst.mkdir(parents=True, exist_ok=True)
    models = modelref.model_files(src_dir)
    data = set()
    for f in models:
        data |= external_files(f)
    for item in sorted(src_dir.iterdir()):
        if (item.suffix == ".onnx" or item.name in data or item.name.endswith(".onnx.data")
                or any(fnmatch.fnmatchcase(item.name, pat) for pat in skip + _LEFTOVERS)):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def replace(tmp: Path, out: Path) -> Path:
    """Move the complete folder (or file) ``tmp`` to ``out``, replacing what is there: the old
    one is renamed aside first and put back if the move fails, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        os.replace(tmp, out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    return out


@dataclass
class FolderStage:
    """The temporary folder a job fills (``tmp``) and the models it is to rewrite."""

    src: Path
    out: Path
    tmp: Path
    models: list[Path]


@contextmanager
def staged_folder(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                  skip: tuple[str, ...] = ()) -> Iterator[FolderStage]:
    """Check and validate, stage the auxiliary files in a temporary folder beside ``out``, let
    the block write the models into ``stage.tmp``, then rename it to ``out`` (nothing is left
    behind if the block raises)."""
    src, out = Path(src), Path(out)
    models = model_files(src)
    check_output(src, out, force)
    for f in models:  # validate all before writing anything (the graphs: weights not read)
        load_proto(f)
    tmp = model.staging_dir(out)
    try:
        copy_aux(src, tmp, skip=skip)
        yield FolderStage(src, out, tmp, models)
        replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def transform_folder(src: str | os.PathLike, out: str | os.PathLike, transform: Transform, *,
                     force: bool = False, skip: tuple[str, ...] = (),
                     finish: Callable[[Path, dict], None] | None = None) -> dict[str, dict]:
    """Write ``out``: ``src``'s auxiliary files, and every model ``f`` as
    ``transform(f, tmp / f.name)`` made it. Returns ``{file name: report}``; each report's
    ``output`` names the final path; the decoder's (else the first) has ``genai``, what
    :func:`lrc.graph.genai.write_config` did. ``finish(tmp, reports)`` runs last, before the
    rename (to write a summary file; name it in ``skip`` so an input's old summary is not
    copied)."""
    reports: dict[str, dict] = {}
    with staged_folder(src, out, force=force, skip=skip) as stage:
        for f in stage.models:
            reports[f.name] = transform(f, stage.tmp / f.name)
        described = genai.write_config(stage.tmp)
        reports.get(described.get("model"), next(iter(reports.values())))["genai"] = described
        for name, r in reports.items():
            r["output"] = str(stage.out / name)
        if finish is not None:
            finish(stage.tmp, reports)
    return reports


__all__ = ["FolderStage", "Transform", "check_output", "copy_aux", "model_files", "replace",
           "staged_folder", "transform_folder"]
