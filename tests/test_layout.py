"""The repository's shape, as a reader meets it: imports run one way, scripts are not libraries, and
every module is short enough to read top to bottom or says why it is one piece."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
# The command-line programs: they import the library and nothing imports them (tests aside).
SCRIPTS = {"train_tok", "train_ar", "sample", "eval", "demo", "bench"}
MAX_LINES = 500


def project_imports(path):
    """(module imported, line number, whether the import sits inside a function, the source line) for every
    import of a top-level module of this repository in `path`, function-level imports included."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in MODULES and top != path.stem:
                found.append((top, node.lineno, id(node) in inside, lines[node.lineno - 1]))
    return found


GRAPH = {name: {dep for dep, *_ in project_imports(path)} for name, path in MODULES.items()}


def test_the_layout_is_the_one_this_test_knows():
    assert SCRIPTS <= set(MODULES) and len(MODULES) > 20


def test_no_import_cycle_among_the_modules():
    """Depth-first search over every import, function-level ones too: a cycle is a module that reaches itself."""
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_no_module_imports_a_script():
    importers = {name: sorted(GRAPH[name] & SCRIPTS) for name in MODULES if GRAPH[name] & SCRIPTS}
    assert importers == {}, f"scripts are imported for helpers: {importers}"


def test_function_level_imports_of_project_modules_say_why():
    """A project module imported inside a function (to break a cycle, or to keep an optional cost off the import)
    carries a comment on that line saying why."""
    silent = [f"{name}.py:{line}: {text.strip()}" for name, path in MODULES.items()
              for _, line, in_function, text in project_imports(path) if in_function and "#" not in text]
    assert silent == []


def test_every_module_is_short_or_says_why_it_is_one_piece():
    long = []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines >= MAX_LINES and "one piece" not in doc:
            long.append(f"{name}.py ({lines} lines)")
    assert long == [], f"over {MAX_LINES} lines without a 'one piece' reason in the docstring: {long}"
