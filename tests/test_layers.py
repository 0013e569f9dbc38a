"""scripts/check_imports.py on the package: the training code and its tasks import no circle and
nothing above them (lazy imports included), and the checker itself finds both kinds of problem."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parents[1] / "scripts" / "check_imports.py"
_spec = importlib.util.spec_from_file_location("check_imports", _path)
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def test_the_package_imports_downwards_only():
    edges = check_imports.graph()
    assert "reformer.tasks.lm" in edges and "reformer.train.loop" in edges
    assert "reformer.generation.decoding" in edges and "reformer.attention.lsh_cache" in edges
    assert check_imports.problems(edges) == []
    assert "reformer.train" not in {t.rpartition(".")[0] for t in edges["reformer.tasks.base"]}
    assert not any(t.startswith("reformer.models") for t in edges["reformer.generation.seq2seq"])


def test_the_checker_finds_circles_and_upward_imports():
    edges = {
        "reformer.tasks.a": {"reformer.train.loop"},  # upward
        "reformer.train.loop": {"reformer.tasks.a"},  # and a circle with it
        "reformer.models.x": set(),
    }
    found = check_imports.problems(edges)
    assert "circle: reformer.tasks.a <-> reformer.train.loop" in found
    assert "upward: reformer.tasks.a imports reformer.train.loop" in found
    assert len(found) == 2
