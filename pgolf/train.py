"""One training run, start to finish: setup, (compile warmup), the timed loop, averaging, export,
round trip from disk, final scores. `main()` is the only reader of the hyperparameters.

Launch: `python -m pgolf.train`, or `torchrun --standalone --nproc_per_node=8 -m pgolf.train`.
"""
from __future__ import annotations

import copy
import sys
import time
import uuid
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pgolf.artifact import (ARTIFACT_NAMES, PACKED_SINGLE_FILE, ROUNDTRIP_LOG_NAMES, SIZE_LABELS, budget_line,
                            code_bytes, export_artifact, load_artifact)
from pgolf.coder import CoderSettings
from pgolf.gptq import GPTQSettings
from pgolf.lqer import LQERSettings
from pgolf.mixed import QuantSettings, matrix_group
from pgolf.averaging import EMA, SWA
from pgolf.config import Hyperparameters, fill_run_defaults, parse_flags, preset_diff, resolve
from pgolf.console import close_bars, progress_bar, run_command, settings_help, summary_line, wants_help
from pgolf.data import DistributedTokenLoader, synthetic_entropy, train_pattern
from pgolf.dist import Dist, setup_dist, teardown_dist
from pgolf.eval import Evaluator, log_eval
from pgolf.execution import apply_execution, attach_attention_kernel, plan_execution
from pgolf.fileio import write_atomic
from pgolf.flops import forward_flops_per_token, train_flops_per_token
from pgolf.model import GPT, GPTConfig, layer_order, mark_qat, rebuild_model, set_qat_gate
from pgolf.optim import AdamConfig, MuonConfig, build_optimizers
from pgolf.projection import mfu, peak_flops
from pgolf.quant import int6_weight_names, max_level, split_patterns
from pgolf.runlog import RunLog, load_checked_data, open_run
from pgolf.ttt import TTTSettings, evaluate_ttt
from pgolf.ttt_cost import run_with_cap
from pgolf.schedule import lr_multiplier, muon_momentum, progress, swa_due


def agree_run_id(cfg: Hyperparameters, d: Dist) -> str:
    run_id = [cfg.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]]
    if d.enabled:
        torch.distributed.broadcast_object_list(run_id, src=0)
    return run_id[0]


def build_evaluator(cfg: Hyperparameters, d: Dist, tokens, tables, sidecar, autocast_dtype) -> Evaluator:
    show = cfg.progress == "1" or (cfg.progress == "auto" and sys.stdout.isatty() and d.is_main)
    return Evaluator.for_run(cfg, d, tokens, tables, sidecar, autocast_dtype, progress=show,
                             ttt_fn=partial(evaluate_ttt, settings=cfg.part(TTTSettings)) if cfg.ttt_enabled else None)


def model_settings(cfg: Hyperparameters) -> GPTConfig:
    """The model's settings with run-dependent defaults filled in (they are stored in the artifact)."""
    model_cfg = cfg.part(GPTConfig)
    model_cfg.rope_train_seq_len = fill_run_defaults(vars(cfg))["rope_train_seq_len"]
    return model_cfg


def build_model(cfg: Hyperparameters, device: torch.device) -> GPT:
    model = GPT(model_settings(cfg)).to(device)
    if cfg.qat:  # fake the export's round-to-nearest grid: MATRIX_BITS, the matrix group's SD-clip
        control, keep = split_patterns(cfg.control_tensor_name_patterns), split_patterns(cfg.fp16_passthrough_patterns)
        quant = cfg.part(QuantSettings)
        mark_qat(model, {name: (max_level(quant.matrix_bits), quant.clip_sigmas(matrix_group(name)))
                         for name in int6_weight_names(model.state_dict(), control, keep)})
        set_qat_gate(model, cfg.qat_start_frac == 0)
    return model


def set_schedule(optimizers, cfg: Hyperparameters, step: int, lr_mul: float) -> None:
    momentum = muon_momentum(step, start=cfg.muon_momentum_warmup_start, end=cfg.muon_momentum,
                             warmup_steps=cfg.muon_momentum_warmup_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_mul
            if "momentum" in group:
                group["momentum"] = momentum


def train_step(model, train_model, optimizers, loader, cfg: Hyperparameters, d: Dist, grad_accum: int,
               autocast_dtype) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss (local)."""
    total = torch.zeros((), device=d.device)
    amp = torch.autocast(d.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for micro in range(grad_accum):
        x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, grad_accum)
        # DDP all-reduces gradients only on the last micro-batch.
        with nullcontext() if (not d.enabled or micro == grad_accum - 1) else train_model.no_sync():
            with amp:
                loss = train_model(x, y)
            (loss / grad_accum).backward()
        total += loss.detach()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / grad_accum


def compile_warmup(model, train_model, optimizers, cfg, d, grad_accum, autocast_dtype, log) -> None:
    """Prime compiled kernels on real steps (with and without depth recurrence, which compile to
    different graphs), then restore the initial weights and optimizer state."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader = DistributedTokenLoader(train_pattern(cfg.data_path), d.rank, d.world_size, d.device, cfg.vocab_size)
    for looping in sorted({False, bool(cfg.num_loops)}):
        model.set_looping(looping)
        for i in range(cfg.warmup_steps):
            train_step(model, train_model, optimizers, loader, cfg, d, grad_accum, autocast_dtype)
            log(f"{'loop_' if looping else ''}warmup_step:{i + 1}/{cfg.warmup_steps}")
    model.set_looping(False)
    model.load_state_dict(saved_model)
    for opt, state in zip(optimizers, saved_opts):
        opt.load_state_dict(state)


class Timer:
    """Training wallclock that excludes validation: pause() around evals."""

    def __init__(self, device: torch.device):
        self.device, self.total_ms, self.t0 = device, 0.0, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self):
        self._sync()
        self.t0 = time.perf_counter()

    def pause(self):
        self._sync()
        self.total_ms += 1000.0 * (time.perf_counter() - self.t0)
        self.t0 = None

    def elapsed_ms(self) -> float:
        return self.total_ms + (1000.0 * (time.perf_counter() - self.t0) if self.t0 is not None else 0.0)


def mean_over_ranks(d: Dist, loss: torch.Tensor) -> float:
    """The mean of a per-rank scalar over ranks; `loss` itself is left as it was (an in-place all-reduce
    once made the progress bar show the sum over ranks)."""
    return d.all_reduce(loss.detach().clone()).item() / d.world_size


def agreed(d: Dist, flag: bool) -> bool:
    """True on every rank as soon as any rank says so, so that ranks switch on the same step."""
    return d.all_reduce(torch.tensor(float(flag), device=d.device), op="max").item() > 0


def train(cfg: Hyperparameters, d: Dist, log: RunLog | None = None) -> dict:
    """Train, export, read the artifact back and score it. Returns the final metrics."""
    # 1. checks and data (before the run folder exists), run folder, log, seeds
    log = RunLog() if log is None else log
    cfg.run_id = agree_run_id(cfg, d)
    work = cfg.iterations * cfg.train_batch_tokens * train_flops_per_token(model_settings(cfg), cfg.train_seq_len,
                                                                          cfg.enable_looping_at)
    ex = plan_execution(cfg.compile, cfg.autocast, d.device, train_flops=work)
    apply_execution(ex, d.device)
    use_compile, autocast_dtype = ex.compile, ex.autocast
    grad_accum = 8 // d.world_size
    data = load_checked_data(cfg, d)
    cfg.bos_id = data.bos_id  # the tokenizer's; the model's BOS-aware parts and the artifact use it
    evaluator = build_evaluator(cfg, d, data.val_tokens, data.tables, data.sidecar, autocast_dtype)
    loader = data.loader
    run_dir = open_run(cfg, d, log, data)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # 2. model, compile, DDP, optimizers
    model = build_model(cfg, d.device)
    attention_kernel = attach_attention_kernel(model, d.device)
    control = split_patterns(cfg.control_tensor_name_patterns)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    log(f"world_size:{d.world_size} grad_accum_steps:{grad_accum} device:{d.device} compile:{use_compile} "
        f"autocast:{autocast_dtype}")
    log(ex.line())
    log(f"attention_mode:gqa num_heads:{cfg.num_heads} num_kv_heads:{cfg.num_kv_heads} mlp_mult:{cfg.mlp_mult} "
        f"smear_gate:{cfg.smear_gate} qat:{cfg.qat} muon_variant:{cfg.muon_variant} attention_kernel:{attention_kernel}")
    log(f"tie_embeddings:{cfg.tie_embeddings} embed_lr:{cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr} "
        f"head_lr:{0.0 if cfg.tie_embeddings else cfg.head_lr} matrix_lr:{cfg.matrix_lr} scalar_lr:{cfg.scalar_lr}")
    log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
    log(f"seed:{cfg.seed}")
    if use_compile:  # graphs of earlier runs in this process would count against dynamo's recompile limit
        torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    train_model = torch.nn.parallel.DistributedDataParallel(
        compiled, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False
    ) if d.enabled else compiled
    optimizers = build_optimizers(model, cfg.part(MuonConfig), cfg.part(AdamConfig), control_patterns=control,
                                  rank=d.rank, world_size=d.world_size, ns_dtype=ex.ns_dtype, compile_ns=use_compile)
    if use_compile and cfg.warmup_steps > 0:
        compile_warmup(model, train_model, optimizers, cfg, d, grad_accum, autocast_dtype, log)
        loader = DistributedTokenLoader(train_pattern(cfg.data_path), d.rank, d.world_size, d.device, cfg.vocab_size)

    # 3. the timed loop
    hidden_fn = torch.compile(model.hidden, dynamic=False) if use_compile else None
    swa, ema = SWA(), EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    max_ms = 1000.0 * cfg.max_wallclock_seconds
    if max_ms > 0 and cfg.gptq_reserve_seconds > 0:  # calibration + quantization count inside the cap
        max_ms -= 1000.0 * cfg.gptq_reserve_seconds
        log(f"gptq:reserving {cfg.gptq_reserve_seconds:.1f}s of the wallclock, training until {max_ms:.0f}ms")
    timer, step, stop_after, qat_on = Timer(d.device), 0, None, cfg.qat and cfg.qat_start_frac == 0
    bar = progress_bar(cfg.iterations) if evaluator.progress else None
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    timer.start()
    while True:
        last = step == cfg.iterations or (stop_after is not None and step >= stop_after)
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            timer.pause()
            r = evaluator.standard(model, hidden_fn)
            ms = timer.total_ms
            log(f"step:{step}/{cfg.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
                f"train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms")
            log.metric("val", step=step, val_loss=r.val_loss, val_bpb=r.val_bpb, train_time_ms=ms)
            pre_quant = r
            timer.start()
        if last:
            break
        elapsed = timer.elapsed_ms()
        frac = progress(step, elapsed, iterations=cfg.iterations, max_wallclock_ms=max_ms)
        lr_mul = lr_multiplier(step, elapsed, iterations=cfg.iterations, warmdown_iters=cfg.warmdown_iters,
                               max_wallclock_ms=max_ms, warmdown_frac=cfg.warmdown_frac, min_lr=cfg.min_lr)
        set_schedule(optimizers, cfg, step, lr_mul)
        if cfg.qat and not qat_on and agreed(d, frac >= cfg.qat_start_frac):
            set_qat_gate(model, True)
            qat_on = True
            log(f"qat:on step:{step}")
        if cfg.num_loops and not model.looping and agreed(d, frac >= cfg.enable_looping_at):
            model.set_looping(True)
            log(f"layer_loop:enabled step:{step} frac:{frac:.3f} order:{','.join(map(str, layer_order(model.cfg, True)))}")
        loss = train_step(model, train_model, optimizers, loader, cfg, d, grad_accum, autocast_dtype)
        step += 1
        if ema is not None:
            ema.update(model)
        if swa_due(step, lr_mul, every=cfg.swa_every, start_frac=cfg.swa_start_frac, start_lr=cfg.swa_start_lr):
            swa.add(model)
            if swa.count == 1:
                log(f"swa:start step:{step} lr_mul:{lr_mul:.4f}")
        ms = timer.elapsed_ms()
        shown = None
        if step <= 10 or step % cfg.train_log_every == 0 or step == cfg.iterations:
            train_loss = shown = mean_over_ranks(d, loss)  # every rank logs on the same steps
            tokens_per_s = step * cfg.train_batch_tokens / max(ms / 1000, 1e-9)
            use = mfu(3 * forward_flops_per_token(model.cfg, cfg.train_seq_len, model.looping), tokens_per_s,
                      d.world_size, peak) if peak else None
            log(f"step:{step}/{cfg.iterations} train_loss:{train_loss:.4f} train_time:{ms:.0f}ms "
                f"step_avg:{ms / step:.2f}ms" + (f" mfu:{100 * use:.1f}%" if use else ""))
            log.metric("train", step=step, train_loss=train_loss, train_time_ms=ms, lr_mul=lr_mul,
                       tokens_per_s=tokens_per_s, mfu=use)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() if shown is None else shown:.3f}", tok_s=f"{step * cfg.train_batch_tokens / max(ms / 1e3, 1e-9):.0f}")
        if max_ms > 0 and stop_after is None:
            reached = torch.tensor(float(ms >= max_ms), device=d.device)
            if d.all_reduce(reached, op="max").item() > 0:
                stop_after = step
                log(f"stopping_early: wallclock_cap train_time:{ms:.0f}ms step:{step}/{cfg.iterations}")
    if bar is not None:
        bar.close()
    train_ms = timer.total_ms
    if d.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")

    # 4. averaging, export, round trip from disk
    if swa.count or ema is not None:
        (swa if swa.count else ema).apply(model)
        log(f"swa:applied checkpoints:{swa.count}" if swa.count else
            f"ema:applied decay:{cfg.ema_decay} updates:{ema.updates}")
        pre_quant = evaluator.standard(model, hidden_fn)
        log_eval(log, "post_swa" if swa.count else "post_ema", pre_quant)
    final = finalize(cfg, d, model, evaluator, run_dir, log, control, train_ms, use_compile)
    final.update(step_stop=step, train_time_ms=train_ms, pre_quant_val_loss=pre_quant.val_loss,
                 pre_quant_val_bpb=pre_quant.val_bpb, swa_checkpoints=swa.count,
                 model_params=sum(p.numel() for p in model.parameters()), run_dir=str(run_dir))
    log.metric("final", **final)
    return final


def calibration_batches(cfg: Hyperparameters, d: Dist):
    """Training micro-batches for GPTQ's Hessians, from the start of the training shards (never val)."""
    loader = DistributedTokenLoader(train_pattern(cfg.data_path), d.rank, d.world_size, d.device, cfg.vocab_size)
    while True:
        yield loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, 8 // d.world_size)


def finalize(cfg, d: Dist, model: GPT, evaluator: Evaluator, run_dir: Path, log: RunLog, control,
             train_ms: float = 0.0, use_compile: bool = False) -> dict:
    """Write the artifact, read it back from disk into a fresh model, score it (standard + sliding)."""
    keep = split_patterns(cfg.fp16_passthrough_patterns)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob, stats = export_artifact(model, cfg.quant_format, control, keep, cfg.part(QuantSettings),
                                  cfg.part(GPTQSettings), cfg.part(LQERSettings), cfg.part(CoderSettings),
                                  calibration_batches=calibration_batches(cfg, d), all_reduce=d.all_reduce, log=log)
    export_ms = 1000.0 * (stats.get("hessian_seconds", 0.0) + stats["quant_seconds"])
    if cfg.max_wallclock_seconds > 0 and cfg.matrix_quant == "gptq":
        log(f"gptq:training+quantization {train_ms + export_ms:.0f}ms of the {1000 * cfg.max_wallclock_seconds:.0f}ms "
            f"cap (reserve {cfg.gptq_reserve_seconds:.1f}s, used {export_ms / 1000:.1f}s)")
        if train_ms + export_ms > 1000 * cfg.max_wallclock_seconds:
            log("WARNING: GPTQ ran past the training cap; raise GPTQ_RESERVE_SECONDS")
    path = run_dir / ARTIFACT_NAMES[cfg.quant_format]
    label = SIZE_LABELS[cfg.quant_format]
    if d.is_main:
        write_atomic(path, blob)
        torch.save(state, run_dir / "final_model.pt")  # the unquantized weights, as the reference keeps them
    d.barrier()
    raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
    code, code_what = code_bytes(preset_diff(cfg))
    total, status = budget_line(len(blob), code)
    log(f"Serialized model: {raw_bytes} bytes")
    log(f"Code size: {code} bytes ({code_what})")
    log(f"Serialized model {label}: {len(blob)} bytes (codec:{stats['codec']} raw_torch:{raw_bytes} "
        f"ratio:{raw_bytes / max(len(blob), 1):.2f}x)")
    log(f"Total submission size {label}: {total} bytes {status}")
    if total > 16_000_000:
        log(f"WARNING: artifact + code = {total} bytes exceeds the 16,000,000-byte limit; this run cannot be submitted")
    state_rt, model_cfg, _ = load_artifact(path)
    fresh = rebuild_model(state_rt, model_cfg, str(path)).to(d.device)
    attach_attention_kernel(fresh, d.device)
    name = ROUNDTRIP_LOG_NAMES[cfg.quant_format]
    hidden_fn = torch.compile(fresh.hidden, dynamic=False) if use_compile else None
    rt = evaluator.standard(fresh, hidden_fn)
    log_eval(log, name, rt)
    out = dict(val_loss=rt.val_loss, val_bpb=rt.val_bpb, roundtrip_val_loss=rt.val_loss, roundtrip_val_bpb=rt.val_bpb,
               bytes_model=len(blob), bytes_code=code, bytes_total=total, quant_format=cfg.quant_format,
               eval_time_ms=1000 * rt.seconds, artifact=str(path))
    if cfg.eval_stride > 0:
        sw = evaluator.sliding(fresh, hidden_fn)
        log_eval(log, "final_sliding_window", sw, f"stride:{cfg.eval_stride} seq_len:{evaluator.eval_seq_len} ")
        out.update(val_loss=sw.val_loss, val_bpb=sw.val_bpb, sliding_val_loss=sw.val_loss, sliding_val_bpb=sw.val_bpb,
                   eval_time_ms=1000 * sw.seconds, sliding_token_forwards=sw.token_forwards, sliding_targets=sw.targets)
    if cfg.ttt_enabled:  # the record's final score: test-time training from the round-tripped weights
        r = run_with_cap(evaluator, fresh, cfg.part(TTTSettings), log)
        out.update(val_loss=r.val_loss, val_bpb=r.val_bpb, ttt_val_loss=r.val_loss, ttt_val_bpb=r.val_bpb,
                   ttt_seconds=r.seconds)
    return out


def step_reached(e: BaseException) -> int:
    """The training loop's step when e was raised: the `step` variable of the innermost frame of this
    module that has one (the loop keeps no extra bookkeeping for this); 0 before the loop."""
    step, tb = 0, e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals.get("step") if tb.tb_frame.f_globals is globals() else None
        step = local if isinstance(local, int) else step
        tb = tb.tb_next
    return step


def run(cfg: Hyperparameters) -> dict:
    """One run. Once its folder exists, an error or Ctrl-C is recorded there before it propagates; a
    finished run ends with its summary line."""
    d = setup_dist()
    log = RunLog()
    try:
        final = train(cfg, d, log)
        d.barrier()  # no rank tears down its communicator while another still uses it
        log(summary_line(final, synthetic_entropy(cfg.data_path)))
        return final
    except KeyboardInterrupt as e:
        close_bars()
        raise KeyboardInterrupt(log.interrupted(step_reached(e))) from None
    except Exception as e:
        close_bars()
        log.failed(step_reached(e), e)
        raise
    finally:
        log.close()
        teardown_dist(d)


def train_from_args(argv: list[str], prog: str) -> int:
    if wants_help(argv):
        print(f"usage: {prog} [--preset NAME] [--name=value ...]   (or env vars NAME=value)\n\n{settings_help(argv)}",
              end="")
        return 0
    preset, flags = parse_flags(argv)
    run(resolve(preset, flags=flags))
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m pgolf.train`, torchrun and the packed train_gpt.py: one-line errors, exit 2 (130 on Ctrl-C)."""
    prog = Path(sys.argv[0]).name if PACKED_SINGLE_FILE else "python -m pgolf.train"
    sys.exit(run_command(prog, lambda args: train_from_args(args, prog), sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
