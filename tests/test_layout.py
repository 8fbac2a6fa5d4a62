"""The shape of the code (issue 17): nuteprune.py holds the method and imports no harness machinery, the project's
modules import each other without a cycle, and no function is longer than a screen."""
import ast

from conftest import ROOT

MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_method_file_imports_no_harness_machinery():
    found = imports(MODULES["nuteprune"])
    assert not found & {"fcntl", "signal", "threading", "argparse", "copy", "shutil"}
    assert not any(name.startswith("torch.distributed") for name in found)


def test_the_top_level_modules_import_each_other_without_a_cycle():
    graph = {m: {n.split(".")[0] for n in imports(p)} & set(MODULES) - {m} for m, p in MODULES.items()}
    done, path = set(), []

    def visit(m):  # depth-first; a module met again on the current path closes a cycle
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_every_function_fits_a_screen():
    long = [f"{p.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")] if ".venv" not in p.parts
            for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
