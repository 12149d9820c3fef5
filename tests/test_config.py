"""The compress config is the one source of ``lrc compress``'s options and of ``lrc.compress``'s
keywords, and the two accept and refuse the same things.

``test_every_option_through_both`` walks every option of :class:`lrc.config.CompressConfig`
(a new option must get an entry in ``CASES``): a valid value gives the same resolved config
through the API (``lrc.compress(model, dry_run=True, **options)``) and through the command line
(``lrc compress MODEL --dry-run --json ...``); an invalid one is refused by both, before any
work, with the same message (options written as keywords in Python and as flags on the
command line).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import lrc
from lrc import config as C
from lrc.cli import app
from lrc.errors import ConfigError, LrcError, render

from graphs import matmul_chain


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("config")
    onnx.save(matmul_chain(d=16, hidden=32), d / "m.onnx")
    (d / "text.txt").write_text("some calibration text " * 20)
    (d / "p.yaml").write_text("ratio: 0.5\n")
    (d / "tokenizer.json").write_text("{}")
    np.savez(d / "x.npz", x=np.zeros((1, 16), np.float32))
    (d / "out").mkdir()
    return d


# option -> (valid options, invalid options), values as Python takes them; {D}: the files folder
CASES = {
    "rank": ({"rank": 8}, {"rank": 0}),
    "energy": ({"energy": 0.9}, {"energy": 1.5}),
    "ratio": ({"ratio": 0.5}, {"ratio": 0.0}),
    "include": ({"include": ["ffn", "attn"]}, {"include": ["nonsense"]}),
    "exclude": ({"exclude": ["head"]}, {"exclude": ["nonsense"]}),
    "policy": ({"policy": "{D}/p.yaml"}, {"policy": "{D}/absent.yaml"}),
    "align": ({"align": 8}, {"align": 0}),
    "allow_larger": ({"allow_larger": True}, {"allow_larger": "yes"}),
    "group_inputs": ({"group_inputs": False}, {"group_inputs": "yes"}),
    "dense_edges": ({"dense_edges": True}, {"dense_edges": "yes"}),
    "tied_head": ({"tied_head": "factor"}, {"tied_head": "sideways"}),
    "recipe": ({"recipe": "plain"}, {"recipe": "fast"}),
    "target_params": ({"target_params": 0.8}, {"target_params": 1.5}),
    "target_size": ({"target_size": 0.003}, {"target_size": -1.0}),
    "target_speedup": ({"target_speedup": 1.01}, {"target_speedup": 0.9}),
    "decode_budget": ({"quantize": "int4", "target_size": 0.003, "decode_budget": 1.2},
                      {"quantize": "int4", "target_size": 0.003, "decode_budget": "slow"}),
    "prefill_budget": ({"quantize": "int4", "target_size": 0.003, "prefill_budget": 1},
                       {"quantize": "int4", "target_size": 0.003, "prefill_budget": "fast"}),
    "ep": ({"ep": "cpu"}, {"ep": "nonsense-ep"}),
    "method": ({"method": "svd"}, {"method": "nope"}),
    "update": ({"method": "svd", "update": False}, {"method": "svd", "update": True}),
    "alpha": ({"method": "asvd", "alpha": 0.3}, {"alpha": 0.3}),
    "update_damp": ({"update_damp": 0.2}, {"update": False, "update_damp": 0.2}),
    "calib": ({"calib": ["{D}/text.txt"]}, {"calib": ["{D}/absent.txt"]}),
    "calib_tokens": ({"calib_tokens": 512}, {"calib_tokens": 0}),
    "calib_seq": ({"calib_seq": 64}, {"calib_seq": 1}),
    "calib_only": ({"calib": ["{D}/text.txt"], "calib_only": True}, {"calib_only": True}),
    "tokenizer": ({"tokenizer": "{D}/tokenizer.json"}, {"tokenizer": "{D}/absent"}),
    "calib_inputs": ({"calib_inputs": ["{D}/x.npz"]}, {"calib_inputs": ["{D}/absent.npz"]}),
    "int8": ({"int8": True}, {"int8": "int4"}),
    "int8_form": ({"int8": True, "int8_form": "qdq"}, {"int8_form": "int4"}),
    "quantize": ({"quantize": "int4"}, {"quantize": "int3"}),
    "block_size": ({"quantize": "int4", "block_size": 16}, {"block_size": 24}),
    "accuracy_level": ({"quantize": "int4", "accuracy_level": 0},
                       {"quantize": "int4", "accuracy_level": 7}),
    "correct_rank": ({"quantize": "int4", "correct_rank": "8,head=16"}, {"correct_rank": "8"}),
    "correct_form": ({"quantize": "int4", "correct_form": "add"}, {"correct_form": "mul"}),
    "base_quant": ({"quantize": "int4", "base_quant": "rtn"}, {"base_quant": "gptq-typo"}),
    "correct_a_bits": ({"quantize": "int4", "correct_rank": "32", "correct_a_bits": 4},
                       {"quantize": "int4", "correct_a_bits": 3}),
    "correct_budget": ({"quantize": "int4", "correct_rank": "auto", "correct_budget": 1.0},
                       {"quantize": "int4", "correct_rank": "8", "correct_budget": 1.0}),
    "embedding": ({"quantize": "int4", "embedding": "float"}, {"embedding": "int2"}),
    "smooth": ({"quantize": "int8", "smooth": 0.5}, {"quantize": "int8", "smooth": 1.5}),
    "scales": ({"quantize": "int4", "scales": "float32"},
               {"quantize": "int4", "scales": "bfloat16"}),
    "target_runtime": ({"quantize": "int8-weight", "target_runtime": "tract"},
                       {"quantize": "int4", "target_runtime": "tract"}),
    "out": ({"out": "{D}/out/small.onnx"}, {"out": "{D}/missing/small.onnx"}),
    "external_data": ({"external_data": True}, {"external_data": "yes"}),
    "force": ({"force": True}, {"force": "yes"}),
    "check": ({"check": False}, {"check": "yes"}),
    "quantize_rest": ({"quantize_rest": "int8"}, {"quantize_rest": "int2"}),
    "dry_run": ({"dry_run": True}, {"dry_run": "yes"}),
}


def _fill(options: dict, d) -> dict:
    def one(v):
        return v.replace("{D}", str(d)) if isinstance(v, str) else v

    return {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in options.items()}


def _argv(options: dict) -> list[str]:
    """The command line for ``options``: a flag per value, the flag repeated for lists,
    ``--no-x`` for a negatable option set false, a value the parser cannot take as it is."""
    argv = []
    for name, v in options.items():
        flag = C.FLAGS[name]
        md = C.FIELDS[name].metadata
        if isinstance(v, list):
            for x in v:
                argv += [flag, str(x)]
        elif v is True:
            argv.append(flag)
        elif v is False:
            argv.append(f"--no-{flag[2:]}" if md.get("negatable") else flag)
        else:
            argv += [flag, str(v)]
    return argv


def test_every_option_has_a_case_and_one_flag():
    cli = [n for n, _, f in C.leaves() if f.metadata.get("cli", True)]
    assert sorted(CASES) == sorted(cli)
    python_only = [(n, f.metadata["why_not_cli"]) for n, _, f in C.leaves()
                   if not f.metadata.get("cli", True)]
    assert [n for n, _ in python_only] == ["factorizer"] and all(why for _, why in python_only)
    assert len(set(C.FLAGS.values())) == len(C.FLAGS)  # one flag per option, no clash


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_option_through_both(name, files):
    valid, invalid = (_fill(o, files) for o in CASES[name])
    model = str(files / "m.onnx")
    runner = CliRunner()
    # valid: the same resolved config both ways (the plan is made, nothing is written)
    _, plan = lrc.compress(model, **{**valid, "dry_run": True})
    r = runner.invoke(app, ["compress", model, "--dry-run", "--json", *_argv(valid)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert json.loads(r.stdout)["config"] == plan["config"]
    assert all(plan["config"][k] == (v if not isinstance(v, tuple) else list(v))
               for k, v in valid.items() if k not in ("dry_run",))
    # invalid: refused by both, before any work, with the same message
    with pytest.raises(LrcError) as api:
        lrc.compress(model, **{"dry_run": True, **invalid})
    r = runner.invoke(app, ["compress", model, "--dry-run", "--json", *_argv(invalid)])
    assert r.exit_code != 0
    if isinstance(r.exception, LrcError):
        assert r.exception.args[0] == api.value.args[0]  # the same message, options unwritten
        assert render(api.value.args[0], C.cli_style) != str(api.value) or \
            "\x1f" not in api.value.args[0]
    else:  # a value the command line's parser itself refuses (a word after a flag)
        assert isinstance(api.value, ConfigError) and r.exit_code == 2


def test_unknown_option_names_the_nearest():
    with pytest.raises(ConfigError, match="unknown option 'calib_token'; did you mean "
                                          "calib_tokens"):
        lrc.compress(matmul_chain(), calib_token=10)
    with pytest.raises(ConfigError, match="unknown option 'target_size_mb'; did you mean "
                                          "target_size"):
        C.CompressConfig.of(target_size_mb=10)


def test_messages_name_options_as_the_reader_writes_them(files):
    """Python shows keywords, the command line its flags, for the same check."""
    with pytest.raises(LrcError) as e:
        lrc.compress(str(files / "m.onnx"), calib_tokens=0)
    assert str(e.value) == "calib_tokens must be positive (an integer), got 0"
    r = CliRunner().invoke(app, ["compress", str(files / "m.onnx"), "--calib-tokens", "0"])
    assert r.exit_code != 0
    assert r.exception.render(C.cli_style) == ("--calib-tokens must be positive (an integer), "
                                               "got 0")
    from clirun import lrc as cli, one_line_error

    line = one_line_error(cli("compress", files / "m.onnx", "--quantize", "int4",
                              "--correct-rank", "8", "--correct-budget", "1"))
    assert line == "lrc: error: --correct-budget goes with --correct-rank auto"


def test_target_size_fills_unset_quant_options_with_what_wins_small():
    """Left unset, base-quant / correct-a-bits / embedding are the plain recipe's (rtn, float A,
    int8 table); with target-size the ones measured to win at small sizes (gptq, 4-bit A, the
    int4 table sharing the tied head's codes); what the user gives is kept either way."""
    plain = C.CompressConfig.of(quantize="int4", correct_rank="32").quant_spec()
    assert (plain.base, plain.correct_a_bits, plain.embedding) == ("rtn", 32, "int8")
    sized = C.CompressConfig.of(quantize="int4", target_size=88).quant_spec()
    assert (sized.base, sized.correct_a_bits, sized.embedding) == ("gptq", 4, "int4")
    assert sized.target_mb == 88
    mine = C.CompressConfig.of(quantize="int4", target_size=88, base_quant="rtn",
                               correct_a_bits=32, embedding="int8").quant_spec()
    assert (mine.base, mine.correct_a_bits, mine.embedding) == ("rtn", 32, "int8")
    # a size with low rank is not the allocator's: the plain defaults
    lowrank = C.CompressConfig.of(quantize="int4", target_size=88, rank=8).quant_spec()
    assert (lowrank.base, lowrank.embedding) == ("rtn", "int8")


def test_decode_budget_goes_with_target_size_and_is_off_unless_given():
    """target-size's second budget: off (bytes alone) unless given; not for a target runtime
    other than ONNX Runtime (the times are its CPU kernels'); without target-size it is one
    line."""
    assert C.CompressConfig.of(quantize="int4", target_size=88).quant_spec().decode_budget is None
    assert C.CompressConfig.of(quantize="int4", target_size=88,
                               decode_budget="1.3").quant_spec().decode_budget == 1.3
    assert C.CompressConfig.of(quantize="int4", target_size=88,
                               decode_budget="off").quant_spec().decode_budget is None
    with pytest.raises(C.ConfigError, match="prices ONNX Runtime's CPU kernels"):
        C.CompressConfig.of(quantize="int8-weight", target_size=88, target_runtime="any",
                            embedding="int8", decode_budget=1.2).validate()
    with pytest.raises(C.ConfigError, match="decode_budget goes with quantize and target_size"):
        C.CompressConfig.of(quantize="int4", correct_rank="32", decode_budget=1.2).validate()
    C.CompressConfig.of(quantize="int4", decode_budget=1.2).validate()  # the recipe may size it
    # the prefill budget: the same rules, its own option
    spec = C.CompressConfig.of(quantize="int4", target_size=88, prefill_budget="1").quant_spec()
    assert (spec.prefill_budget, spec.decode_budget) == (1.0, None)
    assert "prefill within 1x" in spec.describe()
    with pytest.raises(C.ConfigError, match="prefill_budget goes with quantize and target_size"):
        C.CompressConfig.of(quantize="int4", correct_rank="32", prefill_budget=1).validate()


def test_smooth_takes_an_alpha_or_auto():
    """--smooth 0.5 is SmoothQuant's alpha, --smooth auto AWQ's search (weight-only codes
    only: refused for int8 dynamic, in one line, through both the API and the command line)."""
    assert C.CompressConfig.of(quantize="int4", smooth="auto").quant.smooth == "auto"
    assert C.CompressConfig.of(quantize="int8", smooth="0.5").quant.smooth == 0.5
    with pytest.raises(ConfigError, match="not for int8"):
        C.CompressConfig.of(quantize="int4,head=int8", smooth="auto").validate()
    with pytest.raises(ConfigError, match="between 0 and 1"):
        C.CompressConfig.of(quantize="int8", smooth="much").validate()


def test_config_is_nested_and_copies_are_independent():
    c = C.CompressConfig.of(rank=8, quantize="int4", include="ffn,attn")
    assert c.lowrank.rank == 8 and c.quant.quantize == "int4"
    assert c.lowrank.include == ["ffn", "attn"]
    d = c.with_options(rank=4)
    assert (c.lowrank.rank, d.lowrank.rank) == (8, 4)
    assert c.algorithm.settings["asvd"].alpha == 0.5  # each method's own settings class
    assert d.to_dict()["update_damp"] == 0.1


def test_no_flag_text_below_the_command_line():
    """Messages below the CLI name options with lrc.errors.opt, never as flags."""
    import re
    from pathlib import Path

    root = Path(lrc.__file__).parent
    flag = re.compile("|".join(re.escape(f) for f in C.FLAGS.values()) + r"\b")
    found = []
    for p in root.rglob("*.py"):
        if p.name in ("cli.py", "config.py"):  # the command line; the one table of flags
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for lit in re.findall(r"""f?"[^"]*"|f?'[^']*'""", code):  # string literals
                if flag.search(lit) and "``" not in lit:
                    found.append(f"{p.relative_to(root)}:{i}: {line.strip()}")
    assert found == []
