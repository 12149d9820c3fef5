"""The lrc CLI in a subprocess, and the one-line-error contract, for tests."""

import os
import subprocess
import sys

LRC = [sys.executable, "-m", "lrc.cli"]


def lrc(*args, cwd=None, timeout=300):
    env = dict(os.environ, COLUMNS="200", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([*LRC, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def one_line_error(r, code=2) -> str:
    """The single ``lrc: error: ...`` line of a failed run (exit ``code``, no traceback)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lrc: error:"), r.stderr
    return lines[0]
