"""Amalgamate the package into one self-contained train_gpt.py (what a submission ships).

Modules go in dependency order; `pgolf` imports are removed, module docstrings are dropped. The
chosen preset (plus overrides) becomes the file's default and only preset. Packing refuses two
modules defining the same name. Then the file is made lean (pgolf.shake): only what the program
reaches is kept, parts the configuration does not use (GPTQ, LQER, the per-group coder) are left
out, and each import appears once; the packed file refuses a setting that would need a left-out part.

`--compress` ships the counted form instead: the source minified (syntax tree checked unchanged),
lzma-compressed and held in a latin-1 string literal by a four-line stub that execs it; the readable source goes
beside it. Either way the running file counts its own bytes as the code size.
"""
from __future__ import annotations

import ast
import io
import lzma
import tokenize
from pathlib import Path

from pgolf.fileio import write_atomic
from pgolf.shake import shake

PACKAGE_DIR = Path(__file__).resolve().parent
PACKED_MODULES = ["fileio", "dist", "data", "quant", "gptq", "lqer", "mixed", "coder", "layers", "loss", "model",
                  "flops", "projection", "spm", "caseops", "sidecar", "eval", "ttt_lora", "ttt_cost", "ttt", "optim", "schedule", "averaging", "config", "execution", "artifact", "console",
                  "runlog", "train"]
# Parts a configuration may not use: (setting, the value that needs the part, the part's entry points);
# True means any true value. Left out when unused; code that would call them sits behind that setting.
OPTIONAL_PARTS = [
    ("matrix_quant", "gptq", {"collect_hessians", "gptq_quantize"}),
    ("lqer_enabled", True, {"top_k_by_error", "correct", "correction"}),
    ("compressor", "pergroup", {"pack", "unpack", "_lrzip", "lrzip_available"}),
    ("qat", True, {"mark_qat", "fake_quantize"}),
    ("smear_gate", True, {"SmearGate"}),
    ("smear_gate_enabled", True, {"SmearGateAdd"}),
    ("doc_mask", True, {"document_attention", "document_segments", "varlen_attention", "varlen_boundaries",
                          "flash_varlen_kernel", "VARLEN_MODULES"}),
    ("xsa_last_n", True, {"exclude_own_value"}),
    ("sparse_attn_gate_enabled", True, {"SparseAttnGate"}),
    ("parallel_start_layer", True, {"ParallelLanes"}),
    ("fused_ce_enabled", True, {"chunked_softcap_ce"}),
    ("muon_variant", "normuon", {"normuon_normalize"}),
    ("ema_decay", True, {"EMA"}),
    ("ttt_enabled", True, {"evaluate_ttt", "run_with_cap"}),
]
# Never run by a packed file, which reads back only the v2 artifact it wrote: reading v1 files.
NEVER_RUN = {"_decode_v1", "dequantize_state"}
# Constants the packed file fixes (their other branches are dropped).
PACK_CONSTANTS = {"PACKED_SINGLE_FILE": True, "TYPE_CHECKING": False}


class PackError(ValueError):
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


def _amalgamate(modules: list[str]) -> str:
    """The modules as one source: their imports first, then their bodies in order."""
    seen: dict[str, str] = {}
    all_imports: list[str] = []
    bodies = []
    for module in modules:
        source = (PACKAGE_DIR / f"{module}.py").read_text()
        for name in _top_level_names(ast.parse(source)):
            if name in seen:
                raise PackError(f"cannot pack: `{name}` is defined at top level in both pgolf/{seen[name]}.py "
                                f"and pgolf/{module}.py; rename one of them")
            seen[name] = module
        imports, body = _split_module(source, module)
        all_imports += [i for i in imports if i not in all_imports]
        if module == "artifact":
            body = body.replace("PACKED_SINGLE_FILE = False", "PACKED_SINGLE_FILE = True")
        bodies.append(f"# ---- {module} ----\n{body}")
    header = '"""Parameter Golf training script, packed from the pgolf package. Configure with env vars."""\n'
    header += "from __future__ import annotations\n\n" + "\n".join(all_imports)
    return header + "\n\n\n" + "\n\n\n".join(bodies) + "\n\n\nif __name__ == '__main__':\n    main()\n"


def _needs(value, need) -> bool:
    return bool(value) if need is True else value == need


def _left_out(defaults: dict) -> list[tuple[str, object, set[str]]]:
    """The optional parts the configuration `defaults` does not use."""
    from pgolf.config import Hyperparameters

    cfg = Hyperparameters(**defaults)
    return [(name, need, entry) for name, need, entry in OPTIONAL_PARTS if not _needs(getattr(cfg, name), need)]


def _packed_config(defaults: dict, left_out: list) -> str:
    """The file's one preset, its --help (the settings it was packed with) and the check that refuses a
    setting needing a left-out part."""
    packed = dict(sorted(defaults.items()))
    text = (f"\n\n# ---- this file's configuration ----\nPRESETS = {{'packed': {packed!r}}}\nDEFAULT_PRESET = 'packed'\n"
            "PRESET_HELP = {'packed': 'the configuration this file was packed with (its default)'}\n\n\n"
            "def settings_help(argv, env=None, width=0):\n"
            "    return ''.join(f'{k.upper()}={v!r}\\n' for k, v in PRESETS['packed'].items()) + "
            "'(the rest at their defaults)\\n'\n")
    if left_out:
        text += (f"\n\nPACKED_WITHOUT = {[(name, need) for name, need, _ in left_out]!r}\n\n\n"
                 "def validate_packed(cfg, _validate=validate):\n"
                 "    _validate(cfg)\n"
                 "    for name, need in PACKED_WITHOUT:\n"
                 "        value = getattr(cfg, name)\n"
                 "        if bool(value) if need is True else value == need:\n"
                 "            raise ConfigError(f'{name.upper()}={value} needs code this file was packed without; '\n"
                 "                              f'pgolf pack --{name}={value} ... writes one with it')\n\n\n"
                 "validate = validate_packed\n")
    return text


def packed_source(defaults: dict | None = None, lean: bool = True) -> str:
    """The single-file train_gpt.py; `defaults` (field -> value) become its default configuration.
    `lean`: keep only what that configuration can run (see the module docstring)."""
    defaults = defaults or {}
    source = _amalgamate(PACKED_MODULES)
    left_out = _left_out(defaults) if lean else []
    cut = set().union(NEVER_RUN, *(entry for _, _, entry in left_out)) if lean else set()
    replaced = {"PRESETS", "PRESET_HELP", "DEFAULT_PRESET", "settings_help"}
    source = shake(source, cut=cut | replaced, drop_defs=replaced, constants=PACK_CONSTANTS if lean else {})
    if "config" not in PACKED_MODULES:
        return source
    main_at = source.rindex("\nif __name__ == '__main__':")
    return source[:main_at].rstrip("\n") + _packed_config(defaults, left_out) + "\n" + source[main_at:]


# ---- the counted form: minified, lzma, a latin-1 literal, in a self-extracting stub ----

# The exec line is the last line, so a traceback through it stays one short line.
# The stub holds the compressed bytes as a triple-quoted latin-1 string literal (PEP 263 coding line):
# every byte is one character, and only NUL, CR, backslash and some quotes need escapes (~1.5%), where
# base85 costs 25%.
STUB_TEMPLATE = (b'# -*- coding: latin-1 -*-\nimport lzma\n_packed="""%s"""\n'
                 b'exec(lzma.decompress(_packed.encode("latin-1")))\n')
READABLE_NAME = "train_gpt_readable.py"  # the readable twin shipped beside a compressed train_gpt.py


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _one_space_indent(text: str) -> str:
    """Re-indent each logical line with one space per level and drop blank lines; lines inside
    multi-line strings are left alone."""
    lines = text.splitlines()
    level, at_start, starts, blank = 0, True, {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.INDENT:
            level += 1
        elif tok.type == tokenize.DEDENT:
            level -= 1
        elif tok.type == tokenize.NEWLINE:
            at_start = True
        elif tok.type == tokenize.NL and not tok.line.strip():
            blank.add(tok.start[0] - 1)
        elif tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER) and at_start:
            starts[tok.start[0] - 1] = level
            at_start = False
    return "\n".join(" " * starts[i] + line.lstrip(" ") if i in starts else line
                     for i, line in enumerate(lines) if i not in blank) + "\n"


def _strip_annotations(tree: ast.Module) -> ast.Module:
    """Drop the annotations of function arguments and returns, and of plain (non-field) variables: under
    `from __future__ import annotations` they are never evaluated. Class-body annotations stay: they
    make dataclass fields."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            for arg in node.args.args + node.args.kwonlyargs + node.args.posonlyargs + [node.args.vararg, node.args.kwarg]:
                if arg is not None:
                    arg.annotation = None
            node.body = [_plain_assign(n) for n in node.body]
    tree.body = [_plain_assign(n) for n in tree.body]
    return tree


def _plain_assign(node: ast.stmt) -> ast.stmt:
    if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)
    return node


def minify(source: str) -> str:
    """Drop comments, docstrings, blank lines and annotations that are never evaluated, and indent by one
    space. The result must parse to the same syntax tree as the input with its docstrings and those
    annotations removed, else PackError (never a silently different program)."""
    tree = ast.parse(source)
    if any(isinstance(n, ast.Attribute) and n.attr == "__doc__" or isinstance(n, ast.Name) and n.id == "__doc__"
           for n in ast.walk(tree)):
        raise PackError("the packed source reads __doc__, which minify removes; pack without --compress")
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                 for n in tree.body)
    tree = _strip_docstrings(tree)
    if future:
        tree = ast.parse(ast.unparse(_strip_annotations(tree)))
    expected = ast.dump(tree)
    out = _one_space_indent(ast.unparse(tree))
    if ast.dump(ast.parse(out)) != expected:
        raise PackError("minify changed the program's syntax tree; pack without --compress and report this")
    return out


# The .lzma container (13-byte header, no index or checksum, and lzma.decompress detects it) with
# literal-context settings tuned for text: about 0.6% smaller than xz at preset 9e.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0,
                 "nice_len": 128, "dict_size": 1 << 20}]


def latin1_literal(data: bytes) -> bytes:
    """`data` as the body of a triple-quoted str literal in a latin-1 source file. Escaped: backslash; CR
    (reading the source would turn it into LF); NUL (not allowed in source: \\0, or \\x00 before an octal
    digit); a quote followed by a quote or ending the data (it could close the literal)."""
    out = bytearray()
    for i, b in enumerate(data):
        after = data[i + 1:i + 2]
        if b == 0:
            out += b"\\x00" if after in b"01234567" else b"\\0"
        elif b in b"\\\r" or (b == 34 and after in (b'"', b"")):
            out += b"\\r" if b == 13 else b"\\" + bytes((b,))
        else:
            out.append(b)
    return bytes(out)


def compressed_stub(source: str) -> bytes:
    """The self-extracting form of `source` (file bytes): minified, lzma (.lzma container, preset 9e), held
    in a latin-1 string literal; four lines."""
    if "_packed" in _top_level_names(ast.parse(source)):
        raise PackError("the packed source defines `_packed`, the stub's own variable; rename it")
    data = lzma.compress(minify(source).encode("utf-8"), format=lzma.FORMAT_ALONE, filters=LZMA_FILTERS)
    return STUB_TEMPLATE % latin1_literal(data)


def write_packed(out_dir: str | Path, defaults: dict, compress: bool = False, force: bool = False) -> dict[str, int]:
    """Write out_dir/train_gpt.py (the stub when compress, plus the readable twin); -> {path: bytes}.

    Each file is written to a temporary name and renamed, so a failure never leaves a half-built file.
    """
    out_dir = Path(out_dir)
    source = packed_source(defaults)
    files = {"train_gpt.py": compressed_stub(source) if compress else source.encode("utf-8")}
    if compress:
        files[READABLE_NAME] = source.encode("utf-8")
    targets = {out_dir / name: data for name, data in files.items()}
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise PackError(f"{', '.join(existing)} already {verb}; pass --force to overwrite or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, data in targets.items():
        write_atomic(path, data)
    stale_twin = out_dir / READABLE_NAME
    if not compress and stale_twin.exists():  # left by an earlier --compress pack; it no longer matches
        stale_twin.unlink()
    return {str(p): len(d) for p, d in targets.items()}


def pack_command(argv: list[str]) -> int:
    from pgolf.config import preset_diff, resolve
    from pgolf.options import command_parser, parse_with_settings

    parser = command_parser("pgolf pack", __doc__, settings=True)
    parser.add_argument("--out", required=True, help="folder for train_gpt.py, e.g. records/<date>_<slug>/")
    parser.add_argument("--compress", action="store_true",
                        help=f"train_gpt.py becomes the minified lzma stub (readable copy: {READABLE_NAME})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing train_gpt.py")
    args, flags = parse_with_settings(parser, argv)
    # Only the preset and the settings given shape the defaults: the shell's env vars must not leak into the file.
    cfg = resolve(args.preset, env={}, flags=flags)
    written = write_packed(args.out, preset_diff(cfg), compress=args.compress, force=args.force)
    for path, size in written.items():
        print(f"wrote {path}: {size} bytes")
    print(f"code bytes counted: {written[str(Path(args.out) / 'train_gpt.py')]} (train_gpt.py)")
    return 0
