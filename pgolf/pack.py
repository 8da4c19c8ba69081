"""Amalgamate the package into one self-contained train_gpt.py (what a submission ships).

Modules go in dependency order; `pgolf` imports are removed, third-party and stdlib imports are
collected once at the top, module docstrings are dropped. The chosen preset (plus overrides)
becomes the file's default configuration. Packing refuses two modules defining the same name.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKED_MODULES = ["config", "dist", "data", "quant", "model", "eval", "optim", "schedule", "averaging",
                  "artifact", "train"]


class PackError(RuntimeError):
    pass


def _top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def _split_module(source: str, module: str) -> tuple[list[str], str]:
    """-> (external import lines, body with pgolf imports, top imports and the docstring removed)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    drop: set[int] = set()
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgolf"):
            drop.update(range(node.lineno - 1, node.end_lineno))
        elif isinstance(node, ast.Import) and any(a.name.startswith("pgolf") for a in node.names):
            raise PackError(f"pgolf/{module}.py:{node.lineno}: use `from pgolf.x import name`, not `import pgolf.x`")
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno - 1, node.end_lineno))
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgolf")) and not (
                    isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                imports.append(ast.get_source_segment(source, node))
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            drop.update(range(node.lineno - 1, node.end_lineno))
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        drop.update(range(first.lineno - 1, first.end_lineno))
    body = "\n".join(line for i, line in enumerate(lines) if i not in drop).strip("\n")
    return imports, body


def packed_source(defaults: dict | None = None) -> str:
    """The single-file train_gpt.py; `defaults` (field -> value) become its default configuration."""
    seen: dict[str, str] = {}
    all_imports: list[str] = []
    bodies = []
    for module in PACKED_MODULES:
        source = (PACKAGE_DIR / f"{module}.py").read_text()
        for name in _top_level_names(ast.parse(source)):
            if name in seen:
                raise PackError(f"cannot pack: `{name}` is defined at top level in both pgolf/{seen[name]}.py "
                                f"and pgolf/{module}.py; rename one of them")
            seen[name] = module
        imports, body = _split_module(source, module)
        all_imports += [i for i in imports if i not in all_imports]
        if module == "config":
            packed = dict(sorted((defaults or {}).items()))
            body += f"\n\nPRESETS['packed'] = {packed!r}\nDEFAULT_PRESET = 'packed'"
        if module == "artifact":
            body = body.replace("PACKED_SINGLE_FILE = False", "PACKED_SINGLE_FILE = True")
        bodies.append(f"# ---- {module} ----\n{body}")
    header = '"""Parameter Golf training script, packed from the pgolf package. Configure with env vars."""\n'
    header += "from __future__ import annotations\n\n" + "\n".join(all_imports)
    return header + "\n\n\n" + "\n\n\n".join(bodies) + "\n\n\nif __name__ == '__main__':\n    main()\n"
