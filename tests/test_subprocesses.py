"""Every subprocess the product starts is an argument list, never a shell command line.

An AST scan of targetvirt/ and tcmu_handler/: no os.system, os.popen, os.spawn*,
os.exec*, subprocess.getoutput or asyncio.create_subprocess_shell at all; every
subprocess.run/Popen/call/check_call/check_output has no shell=True (nor any shell=
but a literal False) and gets its argv as a list or tuple display, or as a name bound
to one in the same function (or a parameter typed as a list or sequence of str).
A user's name or path can then only ever be one argument, never shell syntax.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("targetvirt", "tcmu_handler")

FORBIDDEN = {
    ("os", "system"), ("os", "popen"), ("os", "spawnl"), ("os", "spawnle"), ("os", "spawnlp"),
    ("os", "spawnlpe"), ("os", "spawnv"), ("os", "spawnve"), ("os", "spawnvp"),
    ("os", "spawnvpe"), ("os", "execl"), ("os", "execle"), ("os", "execlp"), ("os", "execlpe"),
    ("os", "execv"), ("os", "execve"), ("os", "execvp"), ("os", "execvpe"), ("os", "posix_spawn"),
    ("os", "posix_spawnp"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"), ("pty", "spawn"),
}  # fmt: skip
SPAWNERS = {("subprocess", f) for f in ("run", "Popen", "call", "check_call", "check_output")}


def qualified(func: ast.expr, aliases: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """("module", "function") for ``module.function(...)`` or an imported function name."""
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    if isinstance(func, ast.Name):
        return aliases.get(func.id)
    return None


def is_sequence(node: ast.expr) -> bool:
    if isinstance(node, (ast.List, ast.Tuple, ast.ListComp)):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return is_sequence(node.left) or is_sequence(node.right)
    return False


def argv_is_a_list(arg: ast.expr, function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> bool:
    if is_sequence(arg):
        return True
    if not isinstance(arg, ast.Name) or function is None:
        return False
    for a in function.args.args + function.args.kwonlyargs:
        if a.arg == arg.id and a.annotation is not None:
            text = ast.unparse(a.annotation)
            return text.startswith(("list[", "Sequence[", "tuple["))
    bound = [
        node.value
        for node in ast.walk(function)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        and node.value is not None
        and any(
            isinstance(t, ast.Name) and t.id == arg.id
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    return bool(bound) and all(is_sequence(v) for v in bound)


def scan(path: Path, root: Path = ROOT) -> tuple[list[str], int]:
    """(problems, number of subprocess calls checked) in one module."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, tuple[str, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for name in node.names:
                aliases[name.asname or name.name] = (node.module, name.name)
    problems: list[str] = []
    checked = 0

    def visit(node: ast.AST, function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> None:
        nonlocal checked
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if isinstance(child, ast.Call):
                where = f"{path.relative_to(root)}:{child.lineno}"
                name = qualified(child.func, aliases)
                if name in FORBIDDEN:
                    problems.append(f"{where}: {'.'.join(name)} runs a shell or bypasses argv")
                elif name in SPAWNERS:
                    checked += 1
                    for kw in child.keywords:
                        if kw.arg in ("shell", "executable") and not (
                            kw.arg == "shell"
                            and isinstance(kw.value, ast.Constant)
                            and kw.value.value is False
                        ):
                            problems.append(f"{where}: {kw.arg}= {ast.unparse(kw.value)}")
                    if not child.args or not argv_is_a_list(child.args[0], function):
                        problems.append(f"{where}: argv is not a list: {ast.unparse(child)}")
            visit(child, inner or function)

    visit(tree, None)
    return problems, checked


def test_no_subprocess_uses_a_shell() -> None:
    problems: list[str] = []
    checked = 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found, n = scan(path)
            problems += found
            checked += n
    assert not problems, "\n".join(problems)
    assert checked >= 5  # the quickstart's, at least: the scan does see calls


def test_the_scan_catches_shell_strings(tmp_path: Path) -> None:
    """The checker itself: each of these is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, subprocess\n"
        "from subprocess import run as go\n"
        "def f(name: str, argv: list[str]) -> None:\n"
        "    os.system('rm ' + name)\n"
        "    subprocess.run('ls ' + name, shell=True)\n"
        "    go(f'ls {name}')\n"
        "    cmd = 'ls'\n"
        "    subprocess.Popen(cmd)\n"
        "    subprocess.run(argv, shell=False)\n"  # fine
        "    ok = ['ls', name]\n"
        "    subprocess.check_call(ok)\n"  # fine
    )
    problems, checked = scan(bad, tmp_path)
    assert checked == 5
    assert [p.split(":")[1] for p in problems] == ["4", "5", "5", "6", "8"], problems
