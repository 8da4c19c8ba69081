"""What a command shows on the terminal: log lines that keep a progress bar intact, the settings help,
one-line errors with their exit codes, and a run's closing summary line."""
from __future__ import annotations

import errno
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import MISSING, fields

# pgolf's own modules are imported where used: `run_command` wraps every `pgolf` command, and a command
# that needs no torch (significance, report) should not pay for importing it.
HELP_FLAGS = ("-h", "--help")


# Log lines and the progress bar.

def _open_bars() -> list:
    tqdm_module = sys.modules.get("tqdm")  # no bar can be open if tqdm was never imported
    return list(getattr(tqdm_module.tqdm, "_instances", ())) if tqdm_module else []


def echo(msg: str) -> None:
    """Print one line. While a tqdm bar is on screen, print through tqdm, which clears the bar and redraws
    it below the line; a plain print would stick the line to the bar and leave copies of the bar behind."""
    if _open_bars():
        from tqdm import tqdm

        tqdm.write(msg)
        sys.stdout.flush()
    else:
        print(msg, flush=True)


def progress_bar(total: int):
    """The training loop's bar (stderr); log lines go through echo() meanwhile."""
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True)


def close_bars() -> None:
    """Close every open bar (after an error or Ctrl-C), so the message that follows starts on its own line."""
    for bar in _open_bars():
        bar.close()


# One-line errors.

# errno -> what to do about it, for OSErrors raised by the system (ours carry their own fix).
OS_ERROR_FIXES = {
    errno.EACCES: "check its permissions or choose a folder you can write to",
    errno.EPERM: "check its permissions or choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENOSPC: "the disk is full; free some space or choose another folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file is in the way of that path; choose another path",
}


def error_message(e: BaseException) -> str:
    """One line for an expected error: our own messages as they are; an OSError from the system as
    `PATH: reason; fix`."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
        fix = OS_ERROR_FIXES.get(e.errno)
        return f"{where}: {e.strerror}" + (f"; {fix}" if fix else "")
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def run_command(name: str, func, argv: list[str]) -> int:
    """func(argv)'s exit code. Bad input (ValueError, ConfigError) and file-system errors (OSError) become
    one line `NAME: error: ...` and exit 2; Ctrl-C one line and 130. Anything else is a bug: it keeps
    its traceback."""
    try:
        return func(argv) or 0
    except KeyboardInterrupt as e:
        close_bars()
        print(f"{name}: {error_message(e) if str(e) else 'interrupted'}", file=sys.stderr, flush=True)
        return 130
    except (ValueError, OSError) as e:
        close_bars()
        print(f"{name}: error: {error_message(e)}", file=sys.stderr, flush=True)
        return 2


# The settings help.

def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    comments: dict[str, str] = {}
    depth, first, name = 0, True, None
    for tok in tokens:
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            first, name = True, None
        elif tok.type == tokenize.COMMENT:
            if name and name not in comments:
                comments[name] = tok.string.lstrip("#").strip()
        elif tok.type != tokenize.NL and first:  # the first token of a statement: in the class body, a field
            first, name = False, tok.string if depth == 1 and tok.type == tokenize.NAME else None
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """{field: its trailing `# comment`} read from the source of cls and its bases; {} without source
    (the compressed single file runs from a string, so its help shows names and values only)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        comments.update(_class_comments(klass))
    return comments


def _shown(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value) if value != "" else '""'


def _setting_lines(group: list, comments: dict[str, str], cfg, origin: dict[str, str],
                   width: int) -> list[str]:
    lines = []
    for f in group:
        value, note = getattr(cfg, f.name), comments.get(f.name, "")
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in origin and value != default:
            note += f" [{origin[f.name]}; default {_shown(default)}]"
        head = f"  {f.name.upper()}={_shown(value)}"
        if len(head) > width:  # a long value: its comment goes on the next line
            lines += [head] + ([" " * (width + 2) + note.strip()] if note else [])
        else:
            lines.append(f"{head:<{width}}  {note.strip()}".rstrip())
    return lines


def settings_help(argv: list[str], env: dict | None = None, width: int = 38) -> str:
    """The presets with a line each, then every setting grouped by what it configures: NAME=its value
    for the preset, env and flags in argv (the defaults, with none), its comment, and where a value
    that differs from the default came from."""
    from pgolf.config import DEFAULT_PRESET, GROUPS, PRESET_HELP, PRESETS, ConfigError, Hyperparameters, parse_flags, \
        resolve_traced

    try:
        preset, flags = parse_flags([a for a in argv if a not in HELP_FLAGS])
        cfg, origin = resolve_traced(preset, env, flags)
        note = []
    except ConfigError as e:
        cfg, origin = Hyperparameters(), {}
        note = [f"(the values below are the defaults: the settings given do not resolve: {e})"]
    out = [f"presets (--preset NAME, or env PRESET=NAME; default {DEFAULT_PRESET}):"]
    pad = max(map(len, PRESETS)) + 2
    out += [f"  {name:<{pad}}{PRESET_HELP.get(name, '')}".rstrip() for name in PRESETS]
    out += ["", "settings: NAME=value for the preset, env vars and flags given. Set one as an env var NAME=value",
            "or PGOLF_NAME=value, or as a flag --name=value (or --set NAME=VALUE). Precedence, lowest first:",
            "default, preset, env var, flag.", *note, ""]
    listed = set()
    for title, cls in GROUPS:
        group = fields(cls)
        out += [f"{title} ({cls.__name__}):", *_setting_lines(group, field_comments(cls), cfg, origin, width), ""]
        listed.update(f.name for f in group)
    rest = [f for f in fields(Hyperparameters) if f.name not in listed]
    if rest:  # a setting defined on Hyperparameters itself is listed too
        out += ["other:", *_setting_lines(rest, field_comments(Hyperparameters), cfg, origin, width)]
    return "\n".join(out).rstrip() + "\n"


# The closing line of a run.

def summary_line(final: dict, floor: float | None) -> str:
    """One line with what a run ends with: its scores, the entropy floor of a synthetic corpus, the
    submission size against the limit and where the artifact is."""
    from pgolf.artifact import SIZE_LIMIT

    parts = [f"round-trip val_bpb {final['roundtrip_val_bpb']:.4f}"]
    if final.get("sliding_val_bpb") is not None:
        parts.append(f"sliding val_bpb {final['sliding_val_bpb']:.4f}")
    if floor is not None:
        parts.append(f"entropy floor {floor:.4f} (synthetic corpus; gap {final['val_bpb'] - floor:+.4f})")
    total = final["bytes_total"]
    parts.append(f"{total:,} of {SIZE_LIMIT:,} bytes ({'OK' if total <= SIZE_LIMIT else 'OVER THE LIMIT'})")
    parts.append(f"artifact {final['artifact']}")
    return "summary: " + " | ".join(parts)
