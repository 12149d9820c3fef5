"""Writing the small GGUF files tests make."""

from __future__ import annotations


def finish(w) -> None:
    """Write a ``gguf.GGUFWriter``'s header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
