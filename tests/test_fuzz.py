"""Fuzzed bad input through the real CLI (issue #14).

Every case runs ``lrc.cli.main`` (the ``lrc`` entry point: typer, LrcError -> one line) in this
process on tiny synthetic models, with stdout and stderr captured at the file-descriptor level
(so ONNX Runtime's C++ logging counts too), and asserts what a user is promised: a bad input
ends with exit code 2 and one line ``lrc: error: ...`` and nothing else (no traceback, no
library warnings, no "internal error"), and nothing is written — no output, no temporary folder
beside it, no spill folder left in the temp dir. A mutated protobuf may still parse into a valid
model: then the run must succeed and its output must load. The kill test runs ``lrc compress`` in
a subprocess and SIGKILLs it while it writes.

Cases are drawn from a fixed seed; each test prints how many it tried (``pytest -s``) and names
the case in every assertion message.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import matmul_chain
from lrc import cli
import lrc.graph.model as M

SEED = 14


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run(capfd, monkeypatch, tmp_path):
    """``run(*args)``: ``lrc ARGS`` in this process -> Result. Temporary files lrc makes outside
    the output's folder (spill folders) go to ``tmp_path/systmp``, checked empty at the end."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.setenv("COLUMNS", "200")

    def _run(*args) -> Result:
        capfd.readouterr()
        monkeypatch.setattr(sys, "argv", ["lrc", *map(str, args)])
        code = 0
        with warnings.catch_warnings(record=True) as caught:  # what a real run prints
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                          ResourceWarning):  # Python's default filters hide these
                warnings.filterwarnings("ignore", category=quiet)
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capfd.readouterr()
        err = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                      for w in caught) + err
        return Result(code, out, err)

    _run.systmp = systmp
    _run.capfd = capfd
    yield _run
    gc.collect()  # spill folders go when the last model using them does
    assert not list(systmp.iterdir()), f"left in the temp dir: {sorted(systmp.iterdir())}"


def say(run, text: str) -> None:
    with run.capfd.disabled():
        print(text)


def listing(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden ones too), relative."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# bench's progress messages (stderr), the only lines allowed before an error line
PROGRESS = re.compile(r"^\s*(loading \S+|batch \d+ seq \d+: .*|profiling \S+ for .*)$")


def assert_one_line_error(r: Result, case: str) -> str:
    """Exit 2, and the whole of stdout + stderr is one line ``lrc: error: ...`` (after bench's
    progress lines, if any)."""
    text = (r.out + r.err).strip()
    assert "Traceback" not in text, f"{case}: traceback\n{text}"
    assert r.code == 2, f"{case}: exit {r.code}, expected 2 (LrcError)\n{text}"
    lines = [ln for ln in text.splitlines() if ln.strip() and not PROGRESS.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("lrc: error: "), \
        f"{case}: expected one line 'lrc: error: ...', got {len(lines)}:\n{text}"
    return lines[0]


def assert_failed_cleanly(r: Result, case: str, folder: Path, before: set[str]) -> str:
    line = assert_one_line_error(r, case)
    after = listing(folder)
    assert after == before, f"{case}: failed but wrote {sorted(after - before)}" \
                            f"{' and removed ' + str(sorted(before - after)) if before - after else ''}"
    return line


# ------------------------------------------------------------------------------ mutated protobufs
def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a protobuf file: its kind and the new bytes."""
    b = bytearray(data)
    kind = rng.choice(["bitflip", "bytes", "truncate", "insert", "zeros", "duplicate", "varint"])
    if kind == "bitflip":
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        for _ in range(rng.randint(2, 24)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zeros":
        i = rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[i:i + n] = bytes(len(b[i:i + n]))
    elif kind == "duplicate":  # a copy of a chunk inserted elsewhere (repeated fields, tags)
        i = rng.randrange(len(b))
        chunk = b[i:i + rng.randint(1, 200)]
        j = rng.randrange(len(b) + 1)
        b[j:j] = chunk
    else:  # an over-long length / varint: 0xff bytes where a length prefix may sit
        i = rng.randrange(len(b))
        b[i:i + 1] = bytes([0xFF] * rng.randint(1, 9)) + bytes([0x7F])
    return kind, bytes(b)


def _commands(model: Path, good: Path, out: Path, n: int) -> list:
    """The command a case runs (every command that loads a model, in turn)."""
    cmds = [["analyse", model, "--rank", "4"],
            ["compress", model, "--rank", "4", "-o", out],
            ["compress", model, "--quantize", "int8", "-o", out],
            ["verify", good, model],
            ["verify", model, good]]
    return cmds[n % len(cmds)]


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_mutated_protobufs(run, tmp_path, monkeypatch):
    """Byte flips, truncations, insertions, ... of a valid model file, through analyse,
    compress (low rank, int8), verify (either side), and a few through bench; half of
    the compress cases with ``SPILL_THRESHOLD = 0``, so the large-file path that parses the wire
    format by hand (spilling the weights) sees them too."""
    rng = random.Random(SEED)
    good = tmp_path / "good.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), good)
    data = good.read_bytes()
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    model, out = case_dir / "m.onnx", case_dir / "o.onnx"
    n_cases, kinds, outcomes = 240, {}, {"error": 0, "valid": 0}
    spill_default = getattr(M, "SPILL_THRESHOLD", None)  # None: no spilling in this version
    for n in range(n_cases):
        kind, mutated = mutate(data, rng)
        model.write_bytes(mutated)
        before = listing(case_dir)
        args = _commands(model, good, out, n)
        spill = spill_default is not None and args[0] == "compress" and n % 2 == 0
        if n % 120 == 7:  # two through bench (seconds on a model that loads)
            args = ["bench", model, "--runs", "2", "--warmup", "1", "--seq", "4"]
        if spill_default is not None:
            monkeypatch.setattr(M, "SPILL_THRESHOLD", 0 if spill else spill_default)
        case = f"case {n} ({kind}, {args[0]}{', spilled' if spill else ''}) of {n_cases}"
        r = run(*args)
        kinds[kind] = kinds.get(kind, 0) + 1
        if r.code == 0:
            outcomes["valid"] += 1
            assert "Traceback" not in r.out + r.err, case
            if args[0] == "compress":
                onnx.load(str(out))  # a complete model, not a partial file
        else:
            outcomes["error"] += 1
            assert_failed_cleanly(r, case, case_dir, before)
        for p in case_dir.iterdir():
            if p.name != "m.onnx":
                p.unlink()
    say(run, f"fuzz: {n_cases} cases ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
             f"{outcomes['error']} refused, {outcomes['valid']} still valid")
    assert outcomes["error"] > n_cases // 4 and outcomes["valid"] > 0, outcomes


# ------------------------------------------------------------------------------ external data
def _external_model(folder: Path) -> Path:
    """matmul_chain with every initializer in ``m.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "m.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), p, save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    return p


def _set_external(p: Path, tensor: str, **entries) -> None:
    """Rewrite the external-data entries (location, offset, length) of one tensor of ``p``."""
    proto = onnx.load_model(str(p), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.name == tensor)
    info = {e.key: e.value for e in t.external_data}
    for k, v in entries.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = str(v)
    del t.external_data[:]
    for k, v in info.items():
        t.external_data.add(key=k, value=v)
    p.write_bytes(proto.SerializeToString())


W = "model.layers.0.mlp.up_proj.weight"  # 16x64 float32: 4096 bytes


def _external_cases(root: Path) -> dict:
    """name -> entries for the tensor ``W``; files they point at are created under ``root``."""
    (root / "outside.bin").write_bytes(np.ones(4096 // 4, np.float32).tobytes())
    return {
        "absolute": dict(location=str(root / "outside.bin"), offset=0),
        "absolute /etc/passwd": dict(location="/etc/passwd", offset=0),
        "dotdot": dict(location="../outside.bin", offset=0),
        "dotdot inside": dict(location="sub/../../outside.bin", offset=0),
        "symlink leaving": dict(location="link.bin", offset=0),
        "symlinked folder": dict(location="linkdir/outside.bin", offset=0),
        "offset past end": dict(offset=10**9),
        "length past end": dict(length=10**9),
        "offset+length past end": dict(offset=1024 * 9, length=4096),
        "negative offset": dict(offset=-8),
        "negative length": dict(length=-1),
        "offset not a number": dict(offset="abc"),
        "length not a number": dict(length="1e3"),
        "length short of the shape": dict(length=512),
        "missing data file": dict(location="nope.data"),
        "location is a folder": dict(location="adir"),
        "location is the folder": dict(location="."),
        "empty location": dict(location=""),
        "drive letter": dict(location="C:\\weights.bin"),
        "nul in location": dict(location="m.onnx.data\x00.txt"),
    }


@pytest.mark.parametrize("mode", ["file", "folder"])
def test_external_data_refused(run, tmp_path, mode):
    """Hostile or broken external-data entries: refused at load by every command, one line,
    nothing written — including entries that would read a file outside the model's folder."""
    root = tmp_path / "root"
    root.mkdir()
    cases = _external_cases(root)
    good = _external_model(tmp_path / "good")
    n = 0
    for name, entries in cases.items():
        folder = root / f"case{n}"
        p = _external_model(folder)
        (folder / "adir").mkdir()
        (folder / "sub").mkdir()
        os.symlink(root / "outside.bin", folder / "link.bin")
        os.symlink(root, folder / "linkdir")
        _set_external(p, W, **entries)
        src = folder if mode == "folder" else p
        out = root / f"out{n}{'' if mode == 'folder' else '.onnx'}"
        for args in (["analyse", src], ["compress", src, "--rank", "4", "-o", out],
                     ["verify", good, src]):
            before = listing(root)
            case = f"{name} ({mode}, {args[0]} {' '.join(map(str, args[2:]))})"
            assert_failed_cleanly(run(*args), case, root, before)
            n += 1
    say(run, f"fuzz: {n} external-data cases ({mode})")


def test_external_data_valid_still_loads(run, tmp_path):
    """The cases above fail for their entries, not for external data as such."""
    p = _external_model(tmp_path / "ok")
    r = run("compress", p, "--rank", "4", "-o", tmp_path / "ok-out.onnx")
    assert r.code == 0, r.err
    r = run("verify", p, tmp_path / "ok-out.onnx")
    assert r.code == 0, r.err


# ------------------------------------------------------------------------------ policy files
POLICIES = {
    "rank_string.yaml": "rank: abc\n",
    "rank_negative.yaml": "rank: -3\n",
    "rank_zero.json": '{"rank": 0}',
    "rank_float.yaml": "rank: 2.5\n",
    "rank_list.yaml": "rank: [4]\n",
    "ratio_string.json": '{"ratio": "0.5"}',
    "ratio_bool.yaml": "ratio: true\n",
    "ratio_nan.json": '{"ratio": NaN}',
    "ratio_big.yaml": "ratio: 7\n",
    "energy_bool.yaml": "energy: yes\n",
    "two_settings.yaml": "rank: 4\nratio: 0.5\n",
    "top_list.json": "[1, 2]",
    "top_string.yaml": "hello\n",
    "unknown_key.yaml": "rnak: 4\n",
    "unknown_int_key.yaml": "1: 2\nfoo: 3\n",
    "roles_list.yaml": "rank: 4\nroles: [ffn]\n",
    "roles_unknown.yaml": "rank: 4\nroles: {fnn: {rank: 2}}\n",
    "roles_value_list.yaml": "roles: {ffn: [1]}\n",
    "roles_value_int.yaml": "roles: {ffn: 3}\n",
    "roles_mixed_keys.yaml": "roles: {ffn: {1: 2, foo: 3}}\n",
    "roles_empty_setting.yaml": "roles: {ffn: {}}\n",
    "skip_string.json": json.dumps({"rank": 4, "roles": {"ffn": {"rank": 2, "skip": "false"}}}),
    "blocks_list.yaml": "blocks: [0, 1]\n",
    "blocks_bad_key.yaml": "blocks: {'a-b': skip}\n",
    "blocks_open_range.yaml": "blocks: {'1-': skip}\n",
    "blocks_reversed.yaml": "blocks: {'5-2': skip}\n",
    "blocks_huge_range.yaml": "rank: 4\nblocks: {'0-1000000000': skip}\n",
    "nodes_list.yaml": "nodes: ['*up*']\n",
    "include_dict.yaml": "include: {ffn: 1}\n",
    "include_nested.yaml": "rank: 4\ninclude: [[ffn]]\n",
    "include_int.yaml": "include: [3]\n",
    "exclude_unknown.yaml": "exclude: [fnn]\n",
    "align_string.yaml": "align: '8'\n",
    "align_zero.yaml": "align: 0\n",
    "align_bool.yaml": "align: true\n",
    "allow_larger_string.yaml": "rank: 4\nallow_larger: 'no'\n",
    "group_inputs_int.yaml": "rank: 4\ngroup_inputs: 2\n",
    "invalid.yaml": "rank: [4\n",
    "invalid.json": "{rank: 4",
    "tabs.yaml": "rank:\t4\n\troles: x\n",
    "binary.yaml": "\x00\xff\xfe\x01 binary",
    "json_in_yaml_name.json": "rank: 4\n",
}


def test_policy_files_of_wrong_types(run, tmp_path):
    """Every malformed policy: one line naming the problem, through analyse and compress, and
    nothing written; a correct policy beside them works (the cases can fail)."""
    model = tmp_path / "m.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), model)
    pol = tmp_path / "policies"
    pol.mkdir()
    n = 0
    for name, text in POLICIES.items():
        p = pol / name
        p.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text
                      else text.encode("latin-1"))
        for args in (["analyse", model, "--policy", p],
                     ["compress", model, "--policy", p, "-o", tmp_path / "out.onnx"]):
            before = listing(tmp_path)
            t0 = time.perf_counter()
            r = run(*args)
            case = f"policy {name} ({args[0]})"
            assert_failed_cleanly(r, case, tmp_path, before)
            assert time.perf_counter() - t0 < 20, f"{case}: took {time.perf_counter() - t0:.0f} s"
            n += 1
    missing = run("compress", model, "--policy", pol / "absent.yaml", "-o", tmp_path / "o.onnx")
    assert "not found" in assert_one_line_error(missing, "absent policy")
    folder = run("analyse", model, "--policy", pol)
    assert_one_line_error(folder, "policy is a folder")
    ok = pol / "ok.yaml"
    ok.write_text("rank: 4\nroles: {ffn.down: {rank: 2}, attn: skip}\nblocks: {'0-3': {rank: 3}}\n"
                  "allow_larger: false\ninclude: [ffn, attn]\n")
    r = run("compress", model, "--policy", ok, "-o", tmp_path / "ok.onnx")
    assert r.code == 0, r.err
    say(run, f"fuzz: {n + 2} policy cases")


# ------------------------------------------------------------------------------ output paths
def _folder_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    onnx.save(matmul_chain(d=16, hidden=64), folder / "model.onnx")
    (folder / "config.json").write_text("{}")
    return folder


def test_output_paths(run, tmp_path):
    """Outputs that would overwrite or nest in the input, or have no parent: refused, and the
    input (and everything else) left as it was."""
    src = _folder_model(tmp_path / "work" / "src")
    model = src / "model.onnx"
    (tmp_path / "work" / "keep.txt").write_text("not lrc's")
    os.symlink(model, tmp_path / "alias.onnx")
    cases = {
        "folder into a subfolder of itself": ["compress", src, "--rank", "4", "-o", src / "sub"],
        "folder into a nested subfolder (force)": ["compress", src, "--rank", "4", "-o",
                                                   src / "a", "--force"],
        "folder onto itself": ["compress", src, "--rank", "4", "-o", src],
        "folder onto itself (force)": ["compress", src, "--rank", "4", "-o", src, "--force"],
        "folder onto its parent (force)": ["compress", src, "--rank", "4", "-o", src.parent,
                                           "--force"],
        "folder onto its own model file (force)": ["compress", src, "--rank", "4", "-o", model,
                                                   "--force"],
        "file onto itself": ["compress", model, "--rank", "4", "-o", model],
        "file onto itself (force)": ["compress", model, "--rank", "4", "-o", model, "--force"],
        "file onto itself via '..' (force)": [
            "compress", model, "--rank", "4", "-o", src / ".." / "src" / "model.onnx", "--force"],
        "file onto itself via a symlink (force)": [
            "compress", model, "--rank", "4", "-o", tmp_path / "alias.onnx", "--force"],
        "quantize file onto itself (force)": ["compress", model, "--quantize", "int8", "-o",
                                              model, "--force"],
        "parent missing": ["compress", model, "--rank", "4", "-o", tmp_path / "no" / "x.onnx"],
        "folder, parent missing": ["compress", src, "--rank", "4", "-o", tmp_path / "no" / "x"],
    }
    root = tmp_path
    for name, args in cases.items():
        before = {p: (root / p).read_bytes() for p in listing(root) if (root / p).is_file()}
        r = run(*args)
        assert_one_line_error(r, name)
        after = {p: (root / p).read_bytes() for p in listing(root) if (root / p).is_file()}
        assert after == before, f"{name}: changed {sorted(set(after) ^ set(before))}"
    say(run, f"fuzz: {len(cases)} output-path cases")


# ------------------------------------------------------------------------------ killed mid-write
def _big_model(path: Path, mb: int = 40) -> None:
    """A few small projections and one large embedding table (written, not factorised), so
    that most of a compress is spent writing the output."""
    m = matmul_chain(d=16, hidden=64)
    rows = mb * 1024**2 // (16 * 4)
    table = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)
    g = m.graph
    g.initializer.append(onnx.numpy_helper.from_array(table, "embed.weight"))
    g.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]))
    g.node.append(helper.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed/Gather"))
    g.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, ["n", 16]))
    onnx.save(m, path)


def _lrc_proc(*args) -> subprocess.Popen:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lrc.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _wait_for_staging(p: subprocess.Popen, folder: Path, seen: set) -> Path | None:
    """The temporary folder the run stages its output in, once its model file exists (None if
    the run ended first)."""
    t0 = time.monotonic()
    while p.poll() is None:
        new = [d for d in folder.glob(".o.onnx.tmp-*") if d.name not in seen]
        if new and (new[0] / "o.onnx").exists():
            return new[0]
        assert time.monotonic() - t0 < 300, "compress never started writing"
        time.sleep(0.002)
    return None


@pytest.mark.slow  # more than 5 s (make test-fast leaves it out)
def test_compress_killed_mid_write(tmp_path):
    """SIGKILL ``lrc compress --force`` at random moments while it writes (and checks) its
    staged output over a previous output: the output path always holds a complete model (the
    previous one, byte for byte, unless the run had already committed), never a partial file;
    the temporary folders a kill leaves (``.o.onnx.tmp-*``, unavoidable) never sit at the
    output path, and the next run succeeds beside them."""
    rng = random.Random(SEED)
    src = tmp_path / "big.onnx"
    _big_model(src)
    out = tmp_path / "o.onnx"
    p = _lrc_proc("compress", src, "--rank", "4", "-o", out)
    staging = _wait_for_staging(p, tmp_path, set())
    assert staging is not None, p.stderr.read().decode()
    t_staged = time.monotonic()
    while staging.exists() and p.poll() is None:
        time.sleep(0.002)
    window = time.monotonic() - t_staged  # writing + checks of the staged file, to the commit
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    assert not staging.exists()
    previous = out.read_bytes()
    kills, n, partial = 0, 3, []
    for i in range(n):
        seen = {d.name for d in tmp_path.glob(".o.onnx.tmp-*")}
        p = _lrc_proc("compress", src, "--rank", str(3 + i % 2), "-o", out, "--force")
        staging = _wait_for_staging(p, tmp_path, seen)
        time.sleep(rng.uniform(0, window))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
        if p.returncode != -signal.SIGKILL:
            assert p.returncode == 0, p.stderr.read().decode()
        elif staging is not None and (staging / "o.onnx").exists():
            partial.append((staging / "o.onnx").stat().st_size)
        assert out.is_file(), f"kill {i}: the output path is gone"
        now = out.read_bytes()
        if partial and len(partial) == kills and p.returncode == -signal.SIGKILL:
            assert now == previous, f"kill {i} came before the commit but the output changed"
        if now != previous:  # the run had committed before the kill: a complete new model
            onnx.load(str(out))
            previous = now
        visible = sorted(x.name for x in tmp_path.iterdir() if not x.name.startswith("."))
        assert visible == ["big.onnx", "o.onnx", "o.onnx.lrc.json"], f"kill {i}: {visible}"
    left = sorted(x.name for x in tmp_path.glob(".o.onnx.tmp-*"))
    p = _lrc_proc("compress", src, "--rank", "2", "-o", out, "--force")
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    onnx.load(str(out))
    still = sorted(x.name for x in tmp_path.glob(".o.onnx*tmp-*"))
    print(f"fuzz: {n} kills in a {window:.2f} s staging window, {kills} before the run ended, "
          f"{len(partial)} before its commit (staged model {partial} of "
          f"{src.stat().st_size} bytes); {len(left)} temporary folders left beside the output, "
          f"{len(still)} after the next run (which succeeded)")
    if hasattr(M, "clean_leftovers"):  # lrc removes what dead runs left
        assert not still, still
    assert kills >= 2, "the kills all came too late to test anything"


# ------------------------------------------------------------------------------ input arrays
def _input_files(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A good .npz for ``matmul_chain`` (input x: float32 [batch, seq, 16]) and bad ones."""
    folder.mkdir()
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    good = folder / "good.npz"
    np.savez(good, x=x)
    bad = {
        "wrong name": dict(z=x),
        "wrong dtype": dict(x=x.astype(np.int64)),
        "float64": dict(x=x.astype(np.float64)),
        "wrong rank": dict(x=x[0]),
        "wrong fixed dim": dict(x=np.zeros((1, 3, 8), np.float32)),
        "no arrays": {},
        "pickled objects": dict(x=np.array([{"a": 1}], dtype=object)),
    }
    files = {}
    for name, arrays in bad.items():
        files[name] = folder / (name.replace(" ", "_") + ".npz")
        np.savez(files[name], **arrays)
    files["not a zip"] = folder / "not_a_zip.npz"
    files["not a zip"].write_bytes(b"hello, not a zip archive")
    files["truncated zip"] = folder / "truncated.npz"
    files["truncated zip"].write_bytes(good.read_bytes()[:100])
    files["empty folder"] = folder / "empty"
    files["empty folder"].mkdir()
    files["missing"] = folder / "absent.npz"
    return good, files


def test_verify_inputs_of_wrong_name_dtype_shape(run, tmp_path):
    """``lrc verify --inputs``: every bad .npz is one line; pickles are never loaded."""
    model = tmp_path / "m.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), model)
    good, files = _input_files(tmp_path / "inputs")
    assert run("verify", model, model, "--inputs", good).code == 0
    for name, f in files.items():
        before = listing(tmp_path)
        assert_failed_cleanly(run("verify", model, model, "--inputs", f), f"verify --inputs {name}",
                              tmp_path, before)
    say(run, f"fuzz: {len(files)} verify --inputs cases")


def test_input_files_of_wrong_name_dtype_shape(run, tmp_path):
    """``lrc.runtime.feeds.load_inputs`` (the .npz reader of ``eval --inputs`` and ``compress
    --calib-inputs``): bad files by name, and mutated .npz files (stored and compressed), are
    one line of LrcError or a valid batch; then through the CLI options where they exist."""
    from lrc.runtime import feeds as F

    if not hasattr(F, "load_inputs"):
        pytest.skip("lrc.runtime.feeds has no load_inputs yet")
    from lrc.errors import LrcError

    specs = [F.InputSpec("x", np.dtype(np.float32), ["batch", "seq", 16])]
    good, files = _input_files(tmp_path / "inputs")
    assert len(F.load_inputs(good, specs)) == 1
    n = 0
    for name, f in files.items():
        with pytest.raises(LrcError) as e:
            F.load_inputs(f, specs)
        assert "\n" not in str(e.value), f"{name}: {e.value}"
        n += 1
    rng = random.Random(SEED)
    stored = good.read_bytes()
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, x=np.ones((1, 3, 16), np.float32))
    packed = compressed.read_bytes()
    f = tmp_path / "mutated.npz"
    for i in range(200):
        kind, data = mutate(stored if i % 2 else packed, rng)
        f.write_bytes(data)
        try:
            batches = F.load_inputs(f, specs)
        except LrcError as e:
            assert "\n" not in str(e), f"npz case {i} ({kind}): {e}"
        except Exception as e:  # noqa: BLE001 - what the test is for
            pytest.fail(f"npz case {i} ({kind}): {type(e).__name__}: {e} (not an LrcError)")
        else:
            assert batches[0]["x"].shape[-1] == 16
        n += 1

    model = tmp_path / "m.onnx"
    onnx.save(matmul_chain(d=16, hidden=64), model)
    commands = {}
    if "--calib-inputs" in run("compress", "--help").out:
        commands["compress --calib-inputs"] = lambda f: [
            "compress", model, "--rank", "4", "--method", "asvd", "--calib-inputs", f, "-o",
            tmp_path / "out.onnx"]
    if "--inputs" in run("eval", "--help").out:
        commands["eval --inputs"] = lambda f: ["eval", model, model, "--inputs", f]
    for what, make in commands.items():
        r = run(*make(good))
        assert r.code == 0, f"{what} with good inputs: {r.out + r.err}"
        for p in tmp_path.glob("out.onnx*"):
            p.unlink()
        for name, bad in files.items():
            before = listing(tmp_path)
            assert_failed_cleanly(run(*make(bad)), f"{what} {name}", tmp_path, before)
            n += 1
    say(run, f"fuzz: {n} input-file cases (CLI: {', '.join(commands) or 'not wired yet'})")


def test_folder_ignores_what_a_killed_run_left(run, tmp_path):
    """A kill leaves ``.NAME.tmp-*`` (and, mid-replace, ``.NAME.old-*``) folders beside an
    output; when that output sat inside a model folder, compressing the folder later must not
    copy them (a partial model among them) into the new folder."""
    src = _folder_model(tmp_path / "src")
    stale = src / ".model-lrc.onnx.tmp-k1ll3d"
    stale.mkdir()
    (stale / "model-lrc.onnx").write_bytes(b"\x08\x09partial")
    (src / ".out.old-4242").mkdir()
    (src / "tokenizer_config.json").write_text("{}")
    r = run("compress", src, "--rank", "4", "-o", tmp_path / "out")
    assert r.code == 0, r.out + r.err
    names = listing(tmp_path / "out")
    assert "tokenizer_config.json" in names and "config.json" in names
    assert not [n for n in names if ".tmp-" in n or ".old-" in n], sorted(names)


def test_next_run_cleans_what_killed_runs_left(run, tmp_path):
    """The staging folders (and summary temp files) of runs that were killed are removed by the
    next run writing the same output; those of a live process, and unnamed ones, are kept."""
    if not hasattr(M, "clean_leftovers"):
        pytest.skip("lrc.graph.model has no clean_leftovers (leftovers are not cleaned)")
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead.kill()
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        model = tmp_path / "m.onnx"
        onnx.save(matmul_chain(d=16, hidden=64), model)
        src = _folder_model(tmp_path / "src")
        made = {}
        for what, pid in (("dead", dead.pid), ("live", live.pid)):
            for out in ("o.onnx", "out"):
                d = tmp_path / f".{out}.tmp-{pid}-abcd"
                d.mkdir()
                (d / "o.onnx").write_bytes(b"partial")
                made[d] = what
            f = tmp_path / f".o.onnx.lrc.json.tmp-{pid}-xyz"
            f.write_text("{")
            made[f] = what
        legacy = tmp_path / ".o.onnx.tmp-k1ll3d"
        legacy.mkdir()
        made[legacy] = "unnamed"
        assert run("compress", model, "--rank", "4", "-o", tmp_path / "o.onnx").code == 0
        assert run("compress", src, "--rank", "4", "-o", tmp_path / "out").code == 0
        for p, what in made.items():
            assert p.exists() == (what != "dead"), f"{p.name} ({what})"
    finally:
        live.kill()
        live.wait()
