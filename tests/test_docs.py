"""The docs cannot drift: README.md, docs/*.md, bench/README.md and golden/README.md.

- every measured figure sits in a ``<!-- figures: COMMAND -->`` … ``<!-- /figures -->`` block whose
  COMMAND exists in this repository (a module for ``python -m``, a file for ``python path``, a
  subcommand of ``fxpass`` or of ``docs/figures.py``);
- outside those blocks there is no measured figure (a time, a size, dB, a speed ratio, a percentage);
- the blocks made from committed files (golden manifests, the reference's JSON files, the latest bench
  results) are exactly what their command prints now;
- every relative link and image points to a file that exists (and a heading that exists, for anchors);
- README.md starts with the two set-up commands and keeps the line CI runs.

Fast: reads text and JSON only, never lowers a model.  Each checker is also run on a broken sample, so
that a checker that stopped finding anything fails here too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md", REPO / "golden" / "README.md"]
IDS = [str(p.relative_to(REPO)) for p in PAGES]

SETUP_COMMANDS = (
    "python -m pip install -e . && fxpass init camus.pt --seed 0 && fxpass lower camus.pt -o camus.onnx",
    "python -m pip install -e '.[test]' && python -m pytest -q",
)
TEST_COMMAND_LINE = "<!-- test-command -->python -m pip install -e '.[test]' && python -m pytest -q"
FAST_TIER = 'python -m pytest -q -m "not slow"'

# ---- what a measured figure is ----------------------------------------------------------------------
#: a number with a unit of time, size, dB, a speed ratio (2.3×, not 256×256) or a percentage
FIGURE_PATTERNS = {
    "time": r"(?<![\w.])\d+(?:[.,]\d+)*\s?(?:ns|µs|us|ms|s|sec|secs|seconds?|min|mins|minutes?|h|hours?)(?![\w/])",
    "size": r"(?<![\w.])\d+(?:[.,]\d+)*\s?(?:[kKMGT]i?B|bytes)(?!\w)",
    "dB": r"(?<![\w.])\d+(?:[.,]\d+)*\s?dB(?!\w)",
    "ratio": r"(?<![\w.])\d+(?:\.\d+)?\s?×(?!\s*\d)",
    "percent": r"(?<![\w.])\d+(?:\.\d+)?\s?%",
    "throughput": r"(?<![\w.])\d+(?:[.,]\d+)*\s?[GMT]?FLOP(?:/s)?(?!\w)",
}
FIGURE = re.compile("|".join(f"(?P<{k}>{v})" for k, v in FIGURE_PATTERNS.items()))
#: numbers with units that are specifications, not measurements (each phrase exactly as written)
ALLOWED = (
    "≤ 5 minutes",  # the fast tier's budget
    "2 GiB",  # protobuf's limit on one ONNX file
    "nearest-2×",  # the upsample's factor
)


@cache
def figures_module():
    spec = importlib.util.spec_from_file_location("docs_figures", REPO / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks(text: str) -> list[dict]:
    return figures_module().find_blocks(text)


def outside_blocks(text: str) -> str:
    """``text`` with every figure block blanked (newlines kept, so line numbers stay right)."""
    for b in reversed(blocks(text)):
        text = text[:b["start"]] + re.sub(r"[^\n]", " ", text[b["start"]:b["end"]]) + text[b["end"]:]
    return text


def measured_figures(text: str) -> list[str]:
    """``line: kind 'match'`` for each measured figure outside the figure blocks of ``text``."""
    text = outside_blocks(text)
    for phrase in ALLOWED:
        text = text.replace(phrase, " " * len(phrase))
    found = []
    for m in FIGURE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        found.append(f"line {line}: {m.lastgroup} {m.group(0)!r}")
    return found


def marker_problems(text: str) -> list[str]:
    """Openings and closings that do not pair up into blocks (outside fenced code)."""
    masked = figures_module()._mask_fences(text)
    opens, closes, n = masked.count("<!-- figures:"), masked.count("<!-- /figures -->"), len(blocks(text))
    if opens == closes == n:
        return []
    return [f"{opens} '<!-- figures:' openings, {closes} closings, {n} complete blocks"]


# ---- what a figure command is -------------------------------------------------------------------------
def command_problem(command: str) -> str | None:
    """Why ``command`` does not name something in this repository, or None."""
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        return f"{command!r}: {exc}"
    if not tokens:
        return "empty command"
    if tokens[0] in ("python", "python3"):
        if len(tokens) >= 3 and tokens[1] == "-m":
            base = REPO.joinpath(*tokens[2].split("."))
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                return f"{command!r}: no module {tokens[2]} in the repository"
            return None
        if len(tokens) >= 2:
            script = REPO / tokens[1]
            if not script.is_file():
                return f"{command!r}: no file {tokens[1]} in the repository"
            if script.resolve() == (REPO / "docs" / "figures.py").resolve():
                try:
                    figures_module().build_parser().parse_args(tokens[2:])
                except SystemExit:
                    return f"{command!r}: docs/figures.py does not take these arguments"
            return None
        return f"{command!r}: python with nothing to run"
    if tokens[0] == "fxpass":
        from fxpass.cli import COMMANDS

        names = {c.__name__.rsplit(".", 1)[-1] for c in COMMANDS}
        if len(tokens) < 2 or tokens[1] not in names:
            return f"{command!r}: not an fxpass command ({', '.join(sorted(names))})"
        return None
    if tokens[0] == "bash" and len(tokens) >= 2:
        return None if (REPO / tokens[1]).is_file() else f"{command!r}: no file {tokens[1]}"
    return f"{command!r}: not a python, fxpass or bash command of this repository"


# ---- links ---------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of the headings of markdown ``text`` (outside fenced code)."""
    text = figures_module()._mask_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Relative links and images of ``path`` (or of ``text`` as if it were ``path``) that lead nowhere."""
    text = path.read_text(encoding="utf-8") if text is None else text
    masked = figures_module()._mask_fences(text)
    problems = []
    for m in LINK.finditer(masked):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        where, _, anchor = target.partition("#")
        line = masked.count("\n", 0, m.start()) + 1
        if not where:
            if anchor not in anchors(text):
                problems.append(f"line {line}: {target} (no such heading here)")
            continue
        dest = (path.parent / where).resolve()
        if not dest.exists():
            problems.append(f"line {line}: {target} (no {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"line {line}: {target} (no heading #{anchor} in {dest.name})")
    return problems


# ---- the checks on the real pages -------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_figure_block_names_a_command_of_this_repository(page):
    text = page.read_text(encoding="utf-8")
    problems = marker_problems(text)
    problems += [f"line {b['line']}: {command_problem(b['command'])}" for b in blocks(text)
                 if command_problem(b["command"])]
    assert not problems, f"{page.relative_to(REPO)}: " + "; ".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_no_measured_figure_outside_a_figure_block(page):
    found = measured_figures(page.read_text(encoding="utf-8"))
    assert not found, (f"{page.relative_to(REPO)}: measured figures outside a <!-- figures: COMMAND --> block "
                       f"(put them in the block of the command that prints them, or remove them): "
                       + "; ".join(found))


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_resolve(page):
    problems = link_problems(page)
    assert not problems, f"{page.relative_to(REPO)}: broken links: " + "; ".join(problems)


def test_readme_starts_with_the_two_setup_commands_and_keeps_the_ci_line():
    text = README.read_text(encoding="utf-8")
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    assert [b.strip() for b in fenced[:2]] == list(SETUP_COMMANDS), "README's first two code blocks changed"
    lines = text.splitlines()
    assert lines.count(TEST_COMMAND_LINE) == 1, "README lost (or doubled) the <!-- test-command --> line CI runs"
    after = text.split(TEST_COMMAND_LINE + "\n", 1)[1].lstrip("\n").split("\n\n", 1)[0]
    assert FAST_TIER in after, "the sentence naming the fast tier must follow the test-command line"
    second_block_end = text.index(SETUP_COMMANDS[1]) + len(SETUP_COMMANDS[1])
    assert text.index(TEST_COMMAND_LINE) > second_block_end


def test_blocks_made_from_committed_files_are_what_their_command_prints():
    figures = figures_module()
    stale = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for b in blocks(text):
            tokens = shlex.split(b["command"])
            if tokens[:2] != ["python", "docs/figures.py"] or tokens[2:3] == [] or tokens[2] not in figures.COMMITTED:
                continue
            args = figures.build_parser().parse_args(tokens[2:])
            expected = figures.COMMANDS[args.what](args).strip()
            if text[b["body_start"]:b["body_end"]].strip() != expected:
                stale.append(f"{page.relative_to(REPO)} line {b['line']}: rerun `{b['command']} --write`")
    assert not stale, "figure blocks out of date with the files they come from: " + "; ".join(stale)


def test_performance_page_is_the_latest_bench_results():
    sys.path.insert(0, str(REPO))
    from bench.report import END, START, latest_results, render_section

    page = REPO / "docs" / "performance.md"
    text = page.read_text(encoding="utf-8")
    (block,) = [b for b in blocks(text) if b["command"].startswith("python -m bench --readme")]
    body = text[block["body_start"]:block["body_end"]]
    assert body.count(START) == 1 and body.count(END) == 1, "the perf markers must sit inside the figure block"
    section = body.split(START, 1)[1].split(END, 1)[0].strip()
    results = latest_results()
    expected = render_section(json.loads(results.read_text(encoding="utf-8")),
                              str(results.resolve().relative_to(REPO))).strip()
    assert section == expected, (f"docs/performance.md is not generated from {results.relative_to(REPO)}: run "
                                 "python -m bench --readme --readme-path docs/performance.md")


# ---- the checkers themselves find what they must ------------------------------------------------------
def test_the_figure_checker_flags_measurements_and_passes_specifications():
    measured = ["took 3.1 s", "in 1,183 ms", "about 100 s", "31 min on one thread", "171.7 MB", "1.95 GiB",
                "20.95 dB", "about 2× slower", "0.93× the naive", "~80% of kernel time", "220 GFLOP/s"]
    for sample in measured:
        assert measured_figures(f"text {sample} text\n"), sample
    specs = ["opset 21", "256×256", "max|diff| ≤ 1e-4·max|ref|", "2×2 convs", "16 images × 3 masks", "x86",
             "fp16 stays", "2²¹ elements", "(≤ 5 minutes)", "over 2 GiB", "each nearest-2× upsample", "t_index 0",
             "1,679,782 parameters", "`--atol 0.00018`", "jump_n_sample 10 (2,410 model calls)"]
    for sample in specs:
        assert not measured_figures(f"text {sample} text\n"), sample
    inside = "<!-- figures: python docs/figures.py reference -->\ntook 3.1 s\n<!-- /figures -->\n"
    assert not measured_figures(inside)
    example = "```\n<!-- figures: python docs/figures.py reference -->\n```\ntook 3.1 s\n```\n<!-- /figures -->\n```\n"
    assert measured_figures(example), "a block shown inside a code fence must not hide figures"


def test_the_command_checker_refuses_what_is_not_in_the_repository():
    assert command_problem("python -m bench") is None
    assert command_problem("python -m bench.report --print") is None
    assert command_problem("python docs/figures.py precision") is None
    assert command_problem("fxpass lower camus.pt -o camus.onnx") is None
    for bad in ("python -m bench.nosuch", "python -m fxpass.reference.nosuch", "python docs/nosuch.py",
                "python docs/figures.py nosuch", "fxpass nosuch", "make figures", "", "python"):
        assert command_problem(bad), bad
    assert marker_problems("<!-- figures: python -m bench -->\nno closing\n")
    assert marker_problems("closing only\n<!-- /figures -->\n")


def test_the_link_checker_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A section (`--flag`)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    good = "[a](other.md) [b](other.md#a-section---flag) [c](#here) ![d](other.md) [e](https://x.org/y)\n\n# Here\n"
    assert link_problems(page, good) == []
    for bad in ("[a](missing.md)", "[b](other.md#no-such-heading)", "![c](img/missing.png)", "[d](#nowhere)"):
        assert link_problems(page, bad + "\n\n# Here\n"), bad
    assert link_problems(page, "```\n[a](missing.md)\n```\n") == []  # code is not a link
