"""Timed runs of one model in one session, with IO binding on the execution provider's device.

``Runner`` is what bench, the Amdahl profile and the memory probe time: inputs are made once per
``batch x seq`` (:func:`lrc.runtime.feeds.random_token_feeds`), copied to the EP's device
(:func:`lrc.runtime.providers.device_of`: ``cuda`` for CUDA / TensorRT, ``dml`` for DirectML,
the host otherwise) and outputs are left there, so host<->device copies are not timed. A decoder
runs a prefill with an empty cache and then single-token decode steps that are bound to the
``present.*`` outputs of the step before (the cache never leaves the device).

``timing_session`` opens the sessions these runs use: one inter-op thread, ORT warnings off, and
strict (a GPU provider that silently fell back to the CPU is an error, not a slow number).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from lrc.runtime.feeds import has_past, model_config, present_to_past, random_token_feeds, vocab_size
from lrc.runtime.providers import device_of
from lrc.runtime.session import open_session

__all__ = ["Runner", "timing_session"]


def timing_session(path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                   profile_prefix: str | None = None):
    """A session for timing: ``threads`` intra-op threads (None: ORT's default), one inter-op
    thread, warnings off, strict about the provider (a CPU session cannot fall back anyway);
    ``profile_prefix`` switches ORT profiling on."""
    return open_session(path, threads=threads, provider=provider, inter_op=1, log_severity=3,
                        profile_prefix=profile_prefix, strict=True)


class Runner:
    """One model in one session: builds feeds, binds them on the device, times runs."""

    def __init__(self, sess, name: str = "", provider: str | None = None,
                 config: dict | None = None, seed: int = 0):
        self.name, self.sess = name, sess
        self.provider = provider or sess.get_providers()[0]
        self.device = device_of(self.provider)
        self.config = config if config is not None else model_config(sess)
        self.outputs = [o.name for o in sess.get_outputs()]
        self.is_decoder = has_past(sess)
        self.present_to_past = present_to_past(sess)  # LrcError when they cannot be paired
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab_size(sess, self.config) or 100
        self.prefill_values: dict[str, Any] = {}
        self.step_values: list[dict[str, Any]] = []

    def feeds(self, batch: int, seq: int, past_len: int = 0, with_past: bool = True) -> dict:
        """Host feeds at ``batch x seq`` after ``past_len`` cached positions (see
        :func:`lrc.runtime.feeds.random_token_feeds`)."""
        return random_token_feeds(self.sess, batch, seq, past_len, rng=self.rng, vocab=self.vocab,
                                  config=self.config, with_past=with_past)

    def to_device(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        import onnxruntime as ort

        return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), self.device, 0)
                for k, v in feeds.items()}

    def run_bound(self, values: dict[str, Any]):
        """One timed run on device-bound inputs; returns (seconds, {output: OrtValue})."""
        io = self.sess.io_binding()
        for k, v in values.items():
            io.bind_ortvalue_input(k, v)
        for o in self.outputs:
            io.bind_output(o, self.device)
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(io)
        io.synchronize_outputs()
        dt = time.perf_counter() - t0
        return dt, dict(zip(self.outputs, io.get_outputs()))

    def prepare(self, batch: int, seq: int, decode_tokens: int) -> None:
        """Build the (device-bound) inputs for one batch x seq configuration, untimed: the
        prefill (or encoder) inputs and, for decoders, ``decode_tokens`` single-token steps whose
        cache is bound at run time."""
        f = self.feeds(batch, seq)
        # what the prefill / encoder input is, as it is: 1x128 (ids), 1x3x224x224 (pixels)
        self.input_shape = "x".join(str(d) for d in np.shape(next(iter(f.values())))) if f else ""
        self.prefill_values = self.to_device(f)
        self.step_values = []
        if self.is_decoder:
            for t in range(decode_tokens):
                f = self.feeds(batch, 1, past_len=seq + t, with_past=False)
                self.step_values.append(self.to_device(f))

    def decode_step(self, values: dict[str, Any], outs: dict[str, Any]):
        """One timed decode step: ``values`` with the cache bound to ``outs``' present.*."""
        bound = dict(values)
        for pres, past in self.present_to_past.items():
            bound[past] = outs[pres]
        return self.run_bound(bound)

    def one_round(self) -> tuple[float, float | None]:
        """Time the encoder / prefill once and, for decoders, the decode steps that follow;
        returns (prefill seconds, mean seconds per decode step or None)."""
        dt, outs = self.run_bound(self.prefill_values)
        if not self.is_decoder or not self.step_values:
            return dt, None
        total = 0.0
        for vals in self.step_values:
            st, outs = self.decode_step(vals, outs)
            total += st
        return dt, total / len(self.step_values)
