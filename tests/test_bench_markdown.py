"""benchmarks/run.py rewrites BENCHMARKS.md and keeps the sections other scripts wrote."""

from __future__ import annotations

from benchmods import ROOT, load


def _run_script():
    return load("run")


def test_every_scripts_section_survives_a_rewrite(tmp_path):
    """Sections named with hyphens (genai_builder.py's ``genai-builder-decode``...) are kept
    like the plain ones, in order; text outside the markers is not; BENCHMARKS.md's own
    sections are all found."""
    run = _run_script()
    old = ("# old\nstale text\n<!-- quant:begin -->\nQ\n<!-- quant:end -->\nbetween\n"
           "<!-- genai-builder-decode:begin -->\nD\n<!-- genai-builder-decode:end -->\n"
           "<!-- a:begin -->\nunclosed\n")
    assert run.kept_sections(old) == [
        "<!-- quant:begin -->\nQ\n<!-- quant:end -->",
        "<!-- genai-builder-decode:begin -->\nD\n<!-- genai-builder-decode:end -->"]
    md = (ROOT / "BENCHMARKS.md").read_text()
    names = [line[5:-10] for line in md.splitlines()
             if line.startswith("<!-- ") and line.endswith(":begin -->")]
    kept = run.kept_sections(md)
    assert len(kept) == len(names) and "genai-builder-seq" in names
    assert all(k.startswith(f"<!-- {n}:begin -->") for k, n in zip(kept, names))
