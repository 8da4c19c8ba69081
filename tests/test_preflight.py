"""The GPU pre-flight's CPU dry run passes end to end, and its checks catch the differences they exist for."""
from __future__ import annotations

from pgolf import preflight


def test_cpu_dry_run_passes(tiny_data, tmp_path, capsys):
    data_dir, _ = tiny_data
    code = preflight.preflight_command(["--device", "cpu", "--out", str(tmp_path), f"--data_path={data_dir}",
                                        f"--tokenizer_path={data_dir / 'tokenizer.model'}", "--autocast=off"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "preflight: preset seed170 device cpu steps 6 ms/step " in out and "mfu n/a peak_memory n/a" in out
    for check in ("training", "round_trip", "sliding_eval"):
        assert f"  PASS {check}: " in out
    assert out.rstrip().endswith("preflight: PASS")


def test_checks_fail_loudly_on_differences():
    final = dict(roundtrip_val_bpb=2.0, pre_quant_val_bpb=1.8, sliding_val_bpb=2.1)
    main = dict(final=final, losses=[5.0, float("nan"), 4.0])
    eager = dict(losses=[5.0, 4.5, 4.2])
    results = {name: ok for name, ok, _ in preflight.checks(main, eager, "execution:compile=1 autocast=off", "cuda")}
    assert results == dict(execution=False, compiled_equals_eager=False, training=False, round_trip=False,
                           sliding_eval=False)
    main = dict(final=dict(roundtrip_val_bpb=2.0, pre_quant_val_bpb=1.95, sliding_val_bpb=1.97), losses=[5.0, 4.6, 4.1])
    results = {name: ok for name, ok, _ in preflight.checks(main, dict(losses=[5.01, 4.6, 4.12]),
                                                            "execution:compile=1 reason:cuda autocast=bf16", "cuda")}
    assert all(results.values()) and len(results) == 5
