"""lrc: low-rank compression of transformer models at the ONNX graph level."""

__version__ = "0.1.0"

from lrc.errors import LrcError  # noqa: E402

__all__ = ["LrcError", "__version__", "analyse", "compress", "quantize_rest", "verify"]


def __getattr__(name):  # lazy: keep `import lrc` cheap
    if name in ("analyse", "compress", "quantize_rest"):
        from lrc import api

        return getattr(api, name)
    if name == "verify":
        from lrc.measure.verify import verify

        return verify
    raise AttributeError(name)
