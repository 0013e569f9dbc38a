"""Every ``reformer ...`` command in README.md and docs/*.md parses as written, and the README's Python
quick start runs.

Commands are read from fenced code blocks (bash, sh, console or unlabelled), joined over ``\\`` line
ends, with comments, a leading ``$``, environment assignments, ``.venv/bin/``, ``python -m``,
``torchrun ... -m`` and timing wrappers removed; ``VAR="..."`` lines of the same block are expanded in
later ``$VAR``. A trailing ``...`` stands for arguments left out. ``reformer train`` commands also build
their run settings (presets, flags, checks), without reading data or training.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from reformer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
WRAPPERS = {"time", "/usr/bin/time", "nice", "-n", "10", "exec"}


def shell_blocks(text: str):
    """``(first line number, lines)`` of each shell code block."""
    block, kind, start = None, None, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.strip())
        if match and block is None:
            block, kind, start = [], match.group(1), number + 1
        elif line.strip() == "```" and block is not None:
            if kind in SHELL_BLOCKS:
                yield start, block
            block = None
        elif block is not None:
            block.append(line)


def commands(path: Path):
    """``(line number, argv after "reformer")`` of every reformer command in ``path``."""
    for start, lines in shell_blocks(path.read_text()):
        variables: dict[str, str] = {}
        joined, first = "", None
        for offset, raw in enumerate(lines):
            line = raw.rstrip()
            if first is None:
                first = start + offset
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined += line
            text, joined, number, first = joined.strip(), "", first, None
            assignment = re.fullmatch(r'([A-Z_][A-Z0-9_]*)="(.*)"', text)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            for name, value in variables.items():
                text = text.replace(f"${name}", value)
            argv = _reformer_argv(text)
            if argv is not None:
                yield number, argv


def _reformer_argv(text: str) -> list[str] | None:
    text = text.lstrip("$ ").strip()
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return None
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]) or words[0] in WRAPPERS):
        words = words[1:]
    if not words:
        return None
    head = os.path.basename(words[0])
    if head == "reformer":
        rest = words[1:]
    elif head.startswith("python") and words[1:3] == ["-m", "reformer"]:
        rest = words[3:]
    elif (
        head == "torchrun"
        and "-m" in words
        and words[words.index("-m") + 1 : words.index("-m") + 2] == ["reformer"]
    ):
        rest = words[words.index("-m") + 2 :]
    else:
        return None
    if rest and rest[-1] == "...":
        rest = rest[:-1]
    return rest


CASES = [
    pytest.param(argv, id=f"{path.relative_to(ROOT)}:{number}")
    for path in DOCS
    for number, argv in commands(path)
]


def test_the_docs_hold_commands():
    assert len(CASES) > 40  # the extraction itself works
    subcommands = {argv[0] for argv in (case.values[0] for case in CASES) if argv}
    assert {"train", "eval", "generate", "convert", "bench", "predict"} <= subcommands


@pytest.mark.parametrize("argv", CASES)
def test_documented_command_parses(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"reformer {shlex.join(argv)}: argument parsing failed (exit {err.code})")
    if args.command == "train" and not args.resume and args.init is None:
        from reformer.train import config_from_args

        cfg = config_from_args(args)
        cfg.validate()
        cfg.model_config()


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## Python")) + len("```python")
    return text[start : text.index("\n```", start)]


@pytest.mark.slow
def test_the_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_quick_start(), "README.md (Python quick start)", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
