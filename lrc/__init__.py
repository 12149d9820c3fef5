"""lrc: low-rank compression of transformer models at the ONNX graph level."""

from lrc.errors import LrcError
from lrc.version import __version__

__all__ = ["LrcError", "__version__", "analyse", "compress", "quantize_rest", "verify"]


def __getattr__(name):  # lazy: keep `import lrc` cheap
    if name in ("analyse", "compress", "quantize_rest"):
        from lrc import api

        return getattr(api, name)
    if name == "verify":
        from lrc.measure.verify import verify

        return verify
    raise AttributeError(name)
