"""Every ``reformer ...`` command in README.md and docs/*.md parses as written, and the README's Python
quick start runs.

Commands are read from fenced code blocks (bash, sh, console or unlabelled), joined over ``\\`` line
ends, with comments, a leading ``$``, environment assignments, ``.venv/bin/``, ``python -m``,
``torchrun ... -m`` and timing wrappers removed; ``VAR="..."`` lines of the same block are expanded in
later ``$VAR``. A trailing ``...`` stands for arguments left out. ``reformer train`` commands also build
their run settings (presets, flags, checks), without reading data or training.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
# Settings files the docs write before a command reads them: echo '{...}' > NAME.json.
FILES = {
    match.group(2): match.group(1)
    for path in DOCS
    for _, lines in shell_blocks(path.read_text())
    for line in lines
    if (match := re.fullmatch(r"\s*echo '(\{.*\})' > ([\w.-]+\.json)\s*", line))
}


def test_the_docs_hold_commands():
    assert len(CASES) > 40  # the extraction itself works
    subcommands = {argv[0] for argv in (case.values[0] for case in CASES) if argv}
    assert {"train", "eval", "generate", "convert", "bench", "predict"} <= subcommands


def python_blocks(text: str):
    """The code of each ``python`` block."""
    yield from re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@contextlib.contextmanager
def documented_tasks():
    """The tasks the docs define as modules of reformer/tasks (a block opening with that file's name),
    registered while the block is active: their documented commands parse with their flags."""
    from reformer import tasks

    added = []
    for path in DOCS:
        for code in python_blocks(path.read_text()):
            if not re.match(r"# reformer/tasks/\w+\.py\n", code):
                continue
            namespace: dict = {}
            exec(compile(code.replace("from .", "from reformer.tasks."), str(path), "exec"), namespace)
            for task in namespace["TASKS"]:
                tasks.register(task)
                added.append(task.name)
    try:
        yield
    finally:
        for name in added:
            tasks.unregister(name)


@functools.cache
def trained_tasks() -> dict[str, str]:
    """The run folder -> task of every documented ``reformer train`` that starts a run."""
    from reformer.train.train_command import choose_task

    folders = {}
    with documented_tasks():
        for case in CASES:
            argv = case.values[0]
            if argv[:1] != ["train"]:
                continue
            try:
                args = build_parser(argv).parse_args(argv)
                task = choose_task(args)
            except (SystemExit, ValueError, FileNotFoundError):
                continue  # reported by its own case
            if not args.resume:
                folders[(args.out or f"runs/{args.preset or args.task or 'tiny'}").rstrip("/")] = task
    return folders


@pytest.mark.parametrize("argv", CASES)
def test_documented_command_parses(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes (echo '{...}' > FILE) are made here
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if (
        config
        and Path(config).parent.as_posix() in trained_tasks()
        and Path(config).name == "train_config.json"
    ):
        # A documented run's saved settings: those of its task's default preset stand in for them.
        from reformer.train.config import default_preset, preset_config

        task = trained_tasks()[Path(config).parent.as_posix()]
        Path(config).parent.mkdir(parents=True)
        Path(config).write_text(json.dumps(preset_config(default_preset(task), task).to_dict()))
    run = argv[1] if argv[:1] in (["eval"], ["predict"]) and len(argv) > 1 else None
    trained = trained_tasks()
    folder = Path(run).parent.as_posix() if run not in trained and run and Path(run).name == "best" else run
    if folder in trained:
        # The run folder a documented command trained (or its --keep-best copy), as far as its task
        # (which adds flags) goes.
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "train_config.json").write_text(json.dumps({"task": trained[folder]}))
    with documented_tasks():
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as err:
            if err.code == 0 and ("--help" in argv or "-h" in argv):
                return  # the help of a command line that parses
            pytest.fail(f"reformer {shlex.join(argv)}: argument parsing failed (exit {err.code})")
        if args.command == "train" and not args.resume and getattr(args, "init", None) is None:
            from reformer.train import config_from_args

            cfg = config_from_args(args)
            cfg.validate()
            if not {"--data", "--valid", "--tokenizer"} & set(argv):
                try:  # else the vocabulary comes from data files the docs' reader has
                    cfg.model_config()
                except ValueError as err:  # the default corpus of a format whose extra is not installed
                    if "which is not installed: pip install 'reformer[" not in str(err):
                        raise
                    pytest.skip(str(err))


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## Python")) + len("```python")
    return text[start : text.index("\n```", start)]


@pytest.mark.slow
def test_the_readme_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_quick_start(), "README.md (Python quick start)", "exec"), {})
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
