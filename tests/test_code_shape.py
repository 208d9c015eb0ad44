"""Functions in the package stay small: at most `MAX_LINES` lines and `MAX_PARAMETERS`
parameters, unless the line directly above the ``def`` (or above its decorators) is a
comment ``# shape: <reason>`` that says why this one is longer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bitalloc"
MAX_LINES = 60
MAX_PARAMETERS = 8  # self/cls, *args and **kwargs not counted; keyword-only ones are
REASON = "# shape:"

# Functions in files being restructured on other branches: each leaves this list when its
# file is reworked, and nothing may be added to it.
PENDING: set[str] = set()  # file:function still too large (none: keep it so)


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    positional = node.args.posonlyargs + node.args.args
    if in_class and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(node.args.kwonlyargs)


def _has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return first >= 2 and lines[first - 2].strip().startswith(REASON)


def _functions(tree: ast.AST, prefix: str = "", in_class: bool = False):
    """(qualified name, node, defined in a class body) of every function, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node, in_class
            yield from _functions(node, f"{prefix}{node.name}.", False)
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.", True)
        else:
            yield from _functions(node, prefix, in_class)


def offenders(package: Path = PACKAGE) -> dict[str, str]:
    """``file:function`` -> what is too large, for every function without a reason."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for name, node, in_class in _functions(ast.parse(source)):
            length = node.end_lineno - node.lineno + 1
            count = _parameters(node, in_class)
            problems = [f"{length} lines"] * (length > MAX_LINES) + [f"{count} parameters"] * (
                count > MAX_PARAMETERS
            )
            if problems and not _has_reason(lines, node):
                found[f"{path.relative_to(package).as_posix()}:{name}"] = ", ".join(problems)
    return found


def test_functions_are_small_or_say_why():
    found = offenders()
    new = {key: problem for key, problem in found.items() if key not in PENDING}
    assert not new, "too large, with no `# shape: <reason>` comment above the def:\n" + "\n".join(
        f"  {key}: {problem}" for key, problem in sorted(new.items())
    )


def test_pending_list_holds_only_real_offenders():
    """An entry whose function was fixed (or renamed) must leave the list."""
    stale = sorted(PENDING - set(offenders()))
    assert not stale, f"no longer too large (remove from PENDING): {stale}"


def test_the_scan_counts_lines_parameters_and_reasons(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(
        f"def long():\n{body}\n\n"
        "def wide(a, b, c, d, e, f, g, *, h, i, **kw):\n    pass\n\n"
        "def fine(a, b, c, d, e, f, g, h, *args, **kwargs):\n    pass\n\n"
        "class K:\n    def method(self, a, b, c, d, e, f, g, h):\n        pass\n\n"
        "# shape: a table of cases reads best in one piece\n"
        f"@staticmethod\ndef excused():\n{body}\n"
    )
    found = offenders(tmp_path)
    assert found == {"m.py:long": f"{MAX_LINES + 1} lines", "m.py:wide": "9 parameters"}
