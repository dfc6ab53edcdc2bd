"""The code's shape: the algorithm does not import the application, and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
# The chunk-wise algorithm and what it is built from: importable without the run configuration, the launch
# trainer or DeepSpeed's config handling.
ALGORITHM = (
    "chunkwise", "step_plan", "chunk_runner", "concerns", "kv_cache", "state_cache", "attention", "loss",
    "moe", "documents", "layer_checkpoint", "step_state", "schedule", "backend", "options", "unwrap",
    "sequence_parallel",
)  # fmt: skip
APPLICATION = ("engine.trainer", "engine.config", "engine.config_load", "engine.distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from engine import trainer`
    return names


def test_algorithm_modules_exist():
    assert all((ENGINE / f"{m}.py").is_file() for m in ALGORITHM)


@pytest.mark.parametrize("module", ALGORITHM)
def test_algorithm_does_not_import_the_application(module):
    bad = sorted(
        name
        for name in imported_modules(ENGINE / f"{module}.py")
        if any(name == app or name.startswith(app + ".") for app in APPLICATION)
    )
    assert not bad, f"engine/{module}.py imports {bad}"


def application_loaded_by(modules: list[str]) -> list[str]:
    """The application modules a fresh interpreter holds after importing `modules` (nothing this test
    session imported counts)."""
    import subprocess
    import sys

    code = (
        f"import sys\nimport {', '.join(modules)}\n"
        f"print(sorted(m for m in sys.modules if m.startswith({APPLICATION!r})))"
    )
    env = {"PYTHONPATH": str(ENGINE.parent), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return ast.literal_eval(r.stdout.strip().splitlines()[-1])


def test_importing_the_algorithm_loads_no_application_module():
    """Transitively too: nothing the algorithm imports pulls the application in. Negative control: a
    module that does (config_load imports engine.config) is seen."""
    assert application_loaded_by([f"engine.{m}" for m in (*ALGORITHM, "accumulation", "chunk_eval")]) == []
    assert "engine.config" in application_loaded_by(["engine.options", "engine.config_load"])


def test_the_import_walk_sees_the_application(tmp_path):
    """Negative control: both import forms are caught."""
    f = tmp_path / "m.py"
    f.write_text("from engine import trainer\nimport engine.distributed.ds_config\n")
    assert {"engine.trainer", "engine.distributed.ds_config"} <= imported_modules(f)


def function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.end_lineno - node.lineno + 1


def test_no_function_in_engine_is_over_80_lines():
    long = [
        f"{path.relative_to(ENGINE.parent)}:{node.lineno} {node.name} ({n} lines)"
        for path in sorted(ENGINE.rglob("*.py"))
        for node, n in function_lengths(path)
        if n > 80
    ]
    assert not long, long


def test_chunkwise_backward_is_one_screen():
    (node,) = [n for n, _ in function_lengths(ENGINE / "chunkwise.py") if n.name == "chunkwise_backward"]
    body = node.end_lineno - node.body[0].lineno + 1  # from the docstring to the last line
    assert body <= 60, body
