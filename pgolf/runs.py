"""Reading run folders (`runs/<run_id>/`): configuration, metric events, final scores, and
configuration groups. Shared by the record, significance and report commands.

A run folder holds `config.json` (every hyperparameter), `metrics.jsonl` (one JSON object per line,
each with an "event" name: config, data, train, val, the final-eval names and "final"; a run that
stopped early ends with "failed" or "interrupted" instead) and `train.log`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Settings that legitimately differ between the runs of one configuration.
PER_RUN_KEYS = ("seed", "run_id", "out_dir")
EARLY_ENDS = ("failed", "interrupted")  # the metrics record a run writes when it stops before "final"


class RunError(ValueError):
    pass


@dataclass
class Run:
    path: Path
    config: dict
    events: list[dict]
    final: dict | None  # the "final" event; None while running or after a crash

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def run_id(self) -> str:
        return self.config.get("run_id") or self.path.name

    @property
    def label(self) -> str:
        return f"{self.run_id} (seed {self.seed})"

    @property
    def early_end(self) -> dict | None:
        """The "failed" / "interrupted" record of a run that stopped early (None otherwise)."""
        ends = [e for e in self.events if e["event"] in EARLY_ENDS]
        return ends[-1] if ends and self.final is None else None

    @property
    def status(self) -> str:
        """finished | failed at step N: error | interrupted at step N | unfinished (running, or killed)."""
        if self.final is not None:
            return "finished"
        end = self.early_end
        if end is None:
            return "unfinished (still running, or killed without a record)"
        what = f"{end['event']} at step {end.get('step', '?')}"
        return f"{what}: {end['error']}" if end.get("error") else what

    @property
    def entropy_floor(self) -> float | None:
        """The val_bpb floor of a synthetic-corpus run (its "data" record), None on real data."""
        data = next((e for e in self.events if e["event"] == "data" and "entropy_bits_per_byte" in e), None)
        return None if data is None else data["entropy_bits_per_byte"]

    def series(self, event: str, key: str) -> tuple[list[int], list[float], list[float]]:
        """(steps, train_time_ms, values) of one metric over the events of one kind."""
        rows = [e for e in self.events if e.get("event") == event and key in e]
        return [e["step"] for e in rows], [e["train_time_ms"] for e in rows], [e[key] for e in rows]

    def log_lines(self, prefix: str) -> list[str]:
        log = self.path / "train.log"
        if not log.exists():
            return []
        return [line for line in log.read_text(errors="replace").splitlines() if line.startswith(prefix)]


def _read_events(path: Path) -> list[dict]:
    events = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{lineno}: not a JSON line ({e.msg}); the file is corrupt") from None
        if not isinstance(event, dict) or "event" not in event:
            raise RunError(f"{path}:{lineno}: expected an object with an \"event\" field")
        events.append(event)
    return events


def load_run(path: str | Path, require_final: bool = True) -> Run:
    """Read one run folder. With require_final, a run without a "final" event is an error."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise RunError(f"{path}: not a run folder (no such directory)")
    if not metrics.exists():
        raise RunError(f"{path}: no metrics.jsonl; pass a folder written by a training run (runs/<run_id>/)")
    events = _read_events(metrics)
    config_file = path / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
    else:  # the first event repeats the configuration
        config = next(({k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == "config"), None)
        if config is None:
            raise RunError(f"{path}: neither config.json nor a \"config\" event in metrics.jsonl")
    finals = [e for e in events if e["event"] == "final"]
    final = finals[-1] if finals else None
    run = Run(path=path, config=config, events=events, final=final)
    if require_final and final is None:
        raise RunError(f"{path}: metrics.jsonl has no \"final\" event, so the run did not finish ({run.status}); "
                       "wait for it or leave it out")
    return run


def load_runs(paths, require_final: bool = True) -> list[Run]:
    return [load_run(p, require_final) for p in paths]


def shared_config(config: dict) -> dict:
    """The configuration less the per-run keys: equal for runs of the same setup."""
    return {k: v for k, v in config.items() if k not in PER_RUN_KEYS}


def check_same_config(runs: list[Run], group: str = "group") -> dict:
    """Refuse a group whose runs differ in anything but seed/run_id/out_dir; return the shared config."""
    base = shared_config(runs[0].config)
    for run in runs[1:]:
        other = shared_config(run.config)
        diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if diff:
            shown = ", ".join(f"{k}: {base.get(k)!r} vs {other.get(k)!r}" for k in diff[:6])
            more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
            raise RunError(f"{group} mixes configurations: {runs[0].path} and {run.path} differ in {shown}{more}; "
                           "compare runs of one configuration (only seed, run_id and out_dir may differ)")
    return base


@contextmanager
def new_folder(out: str | Path):
    """Build a new output folder in a temporary sibling and rename it into place on success.

    An existing `out` is refused (nothing is overwritten); on any error the partial folder is removed.
    """
    out = Path(out)
    if out.exists():
        raise RunError(f"{out}: output folder already exists; choose a new --out (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would carry over to the published folder
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
