"""The layout keeps the architecture visible: no module-level import cycles, no imports of
another module's private names, the library importable without the program's libraries, and no
task or head names tested outside `tasks/` (the program asks the run's task, never its kind)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "mmtune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _top_level_imports(path: Path, name: str, modules: dict) -> set[str]:
    """mmtune modules imported at module level (not inside functions, not TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return {m for m in found if m in modules and m != name}


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {m: _top_level_imports(p, m, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in graph[m]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_imports_of_private_names_across_modules():
    bad = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmtune"):
                bad += [
                    f"{path.relative_to(SRC)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad, bad


def test_the_library_imports_without_the_program():
    """models/, losses, metrics, data/ and tasks/ load for inference without the program (engine,
    server, CLI, report) or its libraries — FastAPI, uvicorn, matplotlib (open_clip's split between
    its model package and its training package). transformers may bring accelerate itself."""
    code = (
        "import sys, importlib\n"
        "for t in ('contrastive', 'classify', 'vqa', 'caption', 'pretrain_fusion', 'vq_autoencoder', "
        "'text2image', 'sd_lora'):\n"
        "    importlib.import_module('mmtune.tasks.' + t)\n"
        "import mmtune.runs, mmtune.losses, mmtune.metrics, mmtune.models, mmtune.data\n"
        "program = ('fastapi', 'uvicorn', 'matplotlib', 'mmtune.engine', 'mmtune.api', 'mmtune.serve', "
        "'mmtune.cli', 'mmtune.report')\n"
        "print(sorted(m for m in program if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_task_or_head_names_tested_outside_tasks():
    """`x == "vqa"`, `"classify" in spec`…: outside tasks/, code asks the run's task instead (a
    model family may switch on its own head kinds inside models/)."""
    from mmtune.tasks import task_names

    heads = {"vqa", "answer", "caption", "itm", "mlm", "classifier", "decoder"}
    bad = []
    for path in _modules().values():
        where = path.relative_to(PKG).parts
        if "tasks" in where:
            continue
        names = set(task_names()) | (set() if "models" in where else heads)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            consts = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            consts += [
                e
                for n in [node.left, *node.comparators]
                if isinstance(n, ast.Tuple | ast.List | ast.Set)
                for e in n.elts
                if isinstance(e, ast.Constant)
            ]
            hits = [c.value for c in consts if c.value in names]
            bad += [f"{path.relative_to(SRC)}:{node.lineno} tests {h!r}" for h in hits]
    assert not bad, bad
