"""Run folders written directly (no training), with known metrics, for the tools that read runs."""
from __future__ import annotations

import json
from pathlib import Path

from pgolf.config import resolve, to_dict


def fake_run(root: Path, run_id: str, *, seed: int = 1337, val_loss: float = 2.0, val_bpb: float = 1.2,
             steps: int = 20, finished: bool = True, bytes_model: int = 1_000_000, bytes_code: int = 50_000,
             early_end: dict | None = None, entropy_floor: float | None = None, **config) -> Path:
    """root/run_id with config.json, metrics.jsonl (train every step, val every 10, final) and train.log.
    Train loss at step s is 6 - s / 10; val_bpb at step s is 3 - s / 20. An unfinished run ends with
    `early_end` (e.g. {"event": "interrupted", "step": 12}) when given; `entropy_floor` adds the "data"
    record of a synthetic-corpus run."""
    path = Path(root) / run_id
    path.mkdir(parents=True)
    tiny = {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2}
    cfg = to_dict(resolve("baseline", env={}, flags=tiny))
    cfg.update(run_id=run_id, seed=seed, out_dir=str(root), **config)
    (path / "config.json").write_text(json.dumps(cfg))
    events = [{"event": "config", **cfg}]
    if entropy_floor is not None:
        events.append({"event": "data", "synthetic": True, "entropy_bits_per_byte": entropy_floor})
    events += [{"event": "train", "step": s, "train_loss": 6 - s / 10, "train_time_ms": 100.0 * s, "lr_mul": 1.0,
                "tokens_per_s": 1000.0} for s in range(1, steps + 1)]
    events += [{"event": "val", "step": s, "val_loss": 5 - s / 10, "val_bpb": 3 - s / 20, "train_time_ms": 100.0 * s}
               for s in range(0, steps + 1, 10)]
    if finished:
        events.append({"event": "final", "val_loss": val_loss, "val_bpb": val_bpb, "roundtrip_val_loss": val_loss,
                       "roundtrip_val_bpb": val_bpb, "pre_quant_val_loss": val_loss - 0.01,
                       "pre_quant_val_bpb": val_bpb - 0.005, "bytes_model": bytes_model, "bytes_code": bytes_code,
                       "bytes_total": bytes_model + bytes_code, "step_stop": steps, "train_time_ms": 100.0 * steps,
                       "eval_time_ms": 500.0, "model_params": 90_696, "quant_format": "int8_zlib",
                       "swa_checkpoints": 0, "run_dir": str(path), "artifact": str(path / "final_model.int8.ptz")})
    elif early_end is not None:
        events.append(early_end)
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (path / "train.log").write_text(f"run_dir:{path}\npython:3.11.7 torch:2.13.0 platform:test\n"
                                    f"Code size: {bytes_code} bytes (packed train_gpt.py)\n")
    return path
