"""Dead-code removal for the packed train_gpt.py (its bytes count against the size limit).

Works on one module's source, line by line so the readable file keeps its comments:
- keeps the top-level statements the program reaches from its roots (every statement that is not an
  import, a definition or an assignment, e.g. `if __name__ == '__main__'`), following the global names
  each kept definition uses; `cut` names are never followed (parts the packed configuration leaves out;
  the packer refuses settings that would need them);
- folds pack-time constants: `if NAME:` with NAME in `constants` keeps the branch taken, and the rest of
  its block when that branch ends in return/raise;
- merges the imports into one block, each imported name once, only the names still used.
"""
from __future__ import annotations

import ast

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign, ast.AugAssign)


def _target_names(node: ast.stmt) -> set[str]:
    """The global names a top-level statement defines (or, for `X[k] = v`, the X it fills in)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = set()
    for t in targets:
        while isinstance(t, (ast.Subscript, ast.Attribute)):
            t = t.value
        names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _uses(node: ast.AST) -> set[str]:
    """Names a statement reads, annotations aside (they are strings under `from __future__ import annotations`)."""
    skip: set[int] = set()
    for n in ast.walk(node):
        for ann in (getattr(n, "annotation", None), getattr(n, "returns", None)):
            if ann is not None:
                skip |= {id(a) for a in ast.walk(ann)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in skip}


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def reachable(tree: ast.Module, cut: set[str], drop: set[str]) -> set[str]:
    """Global names the program uses, from its root statements (`drop` names' definitions are ignored)."""
    defs: dict[str, list[ast.stmt]] = {}
    roots: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, DEFINITIONS):
            for name in _target_names(node):
                defs.setdefault(name, []).append(node)
        elif not (isinstance(node, ast.Expr) and isinstance(getattr(node.value, "value", None), str)):
            roots |= _uses(node)
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in cut:
            continue
        seen.add(name)
        for node in defs.get(name, []) if name not in drop else []:
            todo += _uses(node) - seen
    return seen


def _import_names(node: ast.stmt) -> list[tuple[str, str]]:
    """(bound name, import line) per alias of an import statement."""
    out = []
    for a in node.names:
        if isinstance(node, ast.ImportFrom):
            bound, line = a.asname or a.name, (node.module, a.name, a.asname)
        else:
            bound, line = a.asname or a.name.split(".")[0], (None, a.name, a.asname)
        out.append((bound, line))
    return out


def _import_block(entries: list[tuple]) -> list[str]:
    plain = sorted({f"import {name}" + (f" as {asname}" if asname else "") for mod, name, asname in entries if mod is None})
    froms: dict[str, list[str]] = {}
    for mod, name, asname in entries:
        if mod is not None:
            spelled = name + (f" as {asname}" if asname else "")
            if spelled not in froms.setdefault(mod, []):
                froms[mod].append(spelled)
    future = [f"from __future__ import {', '.join(froms.pop('__future__'))}"] if "__future__" in froms else []
    return future + plain + [f"from {mod} import {', '.join(sorted(names))}" for mod, names in sorted(froms.items())]


def _fold(body: list[ast.stmt], constants: dict[str, bool], lines: list[str], drop: set[int]) -> None:
    """Fold `if CONST:` statements in a block (recursively), editing `lines` and marking dropped lines."""
    for i, node in enumerate(body):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id in constants:
            taken = node.body if constants[node.test.id] else node.orelse
            gone = node.orelse if constants[node.test.id] else node.body
            drop.add(node.test.lineno - 1)
            for n in gone:
                drop.update(range(_first_line(n) - 1, n.end_lineno))
            if not constants[node.test.id] and node.orelse:
                drop.update(i for i in range(node.body[-1].end_lineno, node.orelse[0].lineno - 1))  # the `else:`
            shift = (taken[0].col_offset - node.col_offset) if taken else 0
            for n in taken:
                for k in range(_first_line(n) - 1, n.end_lineno):
                    lines[k] = lines[k][shift:] if lines[k][:shift].strip() == "" else lines[k]
            if taken and isinstance(taken[-1], (ast.Return, ast.Raise)):
                for n in body[i + 1:]:
                    drop.update(range(_first_line(n) - 1, n.end_lineno))
                return
            if not taken:
                lines[node.test.lineno - 1] = " " * node.col_offset + "pass"
                drop.discard(node.test.lineno - 1)
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], ast.AST):
                _fold(inner, constants, lines, drop)


def fold_constants(source: str, constants: dict[str, bool]) -> str:
    """`source` with every `if NAME:` on a pack-time constant folded to the branch it takes."""
    tree = ast.parse(source)
    lines, drop = source.splitlines(), set()
    _fold(tree.body, constants, lines, drop)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"


def shake(source: str, cut: set[str] = frozenset(), drop_defs: set[str] = frozenset(),
          constants: dict[str, bool] | None = None) -> str:
    """`source` without what the program cannot reach (see the module docstring). `drop_defs`: names whose
    definitions are removed outright (the caller appends replacements)."""
    source = fold_constants(source, constants or {})
    tree = ast.parse(source)
    lines = source.splitlines()
    used = reachable(tree, set(cut), set(drop_defs))
    drop: set[int] = set()
    imports, first_import = [], None
    for node in tree.body:
        span = range(_first_line(node) - 1, node.end_lineno)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            first_import = span.start if first_import is None else first_import
            imports += [line for bound, line in _import_names(node) if bound in used or line[0] == "__future__"]
            drop.update(span)
        elif isinstance(node, DEFINITIONS) and (not _target_names(node) & used or _target_names(node) & drop_defs):
            drop.update(span)
    out = [line for i, line in enumerate(lines) if i not in drop]
    if first_import is not None:
        kept_before = sum(1 for i in range(first_import) if i not in drop)
        out[kept_before:kept_before] = _import_block(imports)
    text = "\n".join(out) + "\n"
    while "\n\n\n\n" in text:  # gaps left by removed definitions
        text = text.replace("\n\n\n\n", "\n\n\n")
    ast.parse(text)  # a syntax error here is a bug in this module, never a file to ship
    return text
