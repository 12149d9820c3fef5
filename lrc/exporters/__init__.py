"""Model export: Hugging Face folders, GGUF files and bundled aliases -> ONNX folders.

Public API::

    export(source, out_dir, task=None, opset=None, force=False) -> ExportResult
    resolve_source(source) -> (Path, kind)        # kind: "hf" | "gguf"
    find_onnx_files(directory) -> list[Path]

Only ``export`` needs torch/transformers/optimum (the ``export`` extra); they are imported
when it runs, so importing this package stays cheap.
"""

from lrc.exporters.hf import TASKS, ExportResult, export, find_onnx_files, infer_task
from lrc.exporters.sources import ALIASES, KIND_GGUF, KIND_HF, resolve_source

__all__ = [
    "ALIASES",
    "KIND_GGUF",
    "KIND_HF",
    "TASKS",
    "ExportResult",
    "export",
    "find_onnx_files",
    "infer_task",
    "resolve_source",
]
