"""`pgolf budget --preset P [--name=value ...]`: will the configuration fit, before any training?

- Parameters are counted per tensor class (embedding, attention, MLP, ...) from the model built on
  the meta device (no memory, no initialisation).
- Each tensor is stored the way the export stores it (`pgolf.quant.export_kind`): int6/int8 levels
  with fp16 row scales, fp16 or fp32 passthrough.
- Compressed bytes = stored bytes x a compression ratio per class. A ratio is measured by
  quantizing weights with `pgolf.quant.quantize_state` and compressing them with the export codec
  (`pgolf.artifact.compress`). Basis "normal": a sample of random-normal rows of the class's width
  (std 1, so the int8 scale floor never binds, as for long-trained weights). Basis "calibrated"
  (`--calibrate ARTIFACT`): the class's own tensors in a real artifact, re-quantized in this format.
- The container (torch.save structure, names, metadata) is measured by serializing an all-zero
  state of this configuration with `pgolf.artifact.serialize`.
- Code bytes are those of the packed train_gpt.py (`--compress`: the stub).
- v2 exports (GPTQ, EMBED_BITS, SD-clip, LQER, COMPRESSOR): a real export of a synthetic state
  (`pgolf.export_budget`), optionally scaled by a real artifact (`--calibrate`) or by the real bytes
  of the preset's own export (`--calibrate-bytes N`, e.g. from a record's log).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pgolf.artifact import CODECS, SIZE_LIMIT, compress, load_artifact, serialize
from pgolf.config import Hyperparameters, preset_diff, resolve
from pgolf.export_budget import calibrate, format_groups, predict_config, uses_v2
from pgolf.model import GPT, GPTConfig
from pgolf.quant import export_kind, quantize_state, split_patterns

SAMPLE_ELEMENTS = 1 << 18  # rows of a tensor sampled for a ratio (more than the 65,536 small-tensor cut)
CODE_WHAT = {False: "readable packed train_gpt.py", True: "lzma-compressed train_gpt.py stub"}
NOMINAL_BITS = {"int6": 6, "int8": 8, "int8_tensor": 8, "fp16": 16, "fp32": 32}
ROLES = (("embedding", re.compile(r"^tok_emb\.")), ("head", re.compile(r"^lm_head\.")),
         ("attention", re.compile(r"\.attn\.")), ("mlp", re.compile(r"\.mlp\.")), ("smear", re.compile(r"^smear\.")))


def tensor_role(name: str, control: list[str]) -> str:
    if any(p and p in name for p in control):
        return "control"
    return next((role for role, pattern in ROLES if pattern.search(name)), "other")


def model_shapes(cfg: Hyperparameters) -> dict[str, torch.Tensor]:
    """The state dict as meta tensors (shapes and dtypes only)."""
    with torch.device("meta"):
        return dict(GPT(cfg.part(GPTConfig)).state_dict())


def stored_bytes(kind: str, t: torch.Tensor) -> int:
    """Bytes of a tensor in the export payload before compression (levels + scales, or passthrough)."""
    n = t.numel()
    if kind in ("int6", "int8"):
        return n + 2 * t.shape[0]  # int8 levels + one fp16 scale per row
    if kind == "int8_tensor":
        return n + 4  # one fp32 scale
    return n * {"fp16": 2, "fp32": 4}.get(kind, t.element_size())


def entry_bytes(entry: dict) -> bytes:
    """The raw tensor bytes of one quantize_state entry, concatenated."""
    return b"".join(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    for v in entry.values() if isinstance(v, torch.Tensor))


@dataclass
class ClassRow:
    role: str
    kind: str
    tensors: int
    params: int
    stored: int
    ratio: float

    @property
    def compressed(self) -> int:
        return round(self.stored * self.ratio)


@dataclass
class Prediction:
    rows: list[ClassRow]
    container: int
    code: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def model(self) -> int:
        return self.container + sum(r.compressed for r in self.rows)

    @property
    def total(self) -> int:
        return self.model + self.code


class Planner:
    """Predicts export bytes for configurations sharing one format, caching a ratio per class."""

    def __init__(self, cfg: Hyperparameters, calibrate: str | None = None, seed: int = 0):
        self.fmt, self.codec = cfg.quant_format, CODECS[cfg.quant_format]
        self.control = split_patterns(cfg.control_tensor_name_patterns)
        self.keep = split_patterns(cfg.fp16_passthrough_patterns)
        self.generator = torch.Generator().manual_seed(seed)
        self.ratios: dict[tuple[str, str], float] = {}
        self.basis: dict[tuple[str, str], str] = {}
        self.warning = ""
        if calibrate:
            self._calibrate(calibrate)

    def _ratio_of(self, data: bytes) -> float:
        return len(compress(data, self.codec)) / max(len(data), 1)

    def _calibrate(self, path: str) -> None:
        state, _, fmt = load_artifact(path)
        entries = quantize_state(state, self.fmt, self.control, self.keep)
        groups: dict[tuple[str, str], list[bytes]] = {}
        for name, entry in entries.items():
            groups.setdefault((tensor_role(name, self.control), entry["kind"]), []).append(entry_bytes(entry))
        for key, chunks in groups.items():
            self.ratios[key] = self._ratio_of(b"".join(chunks))
            self.basis[key] = f"calibrated on {Path(path).name} ({fmt} artifact)"
        if fmt != self.fmt:
            self.warning = (f"warning: {path} is a {fmt} artifact; its weights sit on that format's grid and compress "
                            f"unlike trained weights when stored as {self.fmt} (docs/submission.md measured -13%); "
                            f"calibrate on a {self.fmt} artifact")

    def _sample_ratio(self, name: str, t: torch.Tensor) -> float:
        shape = list(t.shape)
        if t.ndim >= 2 and t.numel() > SAMPLE_ELEMENTS:
            shape[0] = math.ceil(SAMPLE_ELEMENTS / (t.numel() // shape[0]))
        sample = torch.randn(shape, generator=self.generator).to(t.dtype if t.is_floating_point() else torch.float32)
        entry = quantize_state({name: sample}, self.fmt, self.control, self.keep)[name]
        return self._ratio_of(entry_bytes(entry))

    def ratio(self, key: tuple[str, str], name: str, t: torch.Tensor) -> float:
        if key not in self.ratios:
            self.ratios[key] = self._sample_ratio(name, t)
            self.basis[key] = "random-normal sample"
        return self.ratios[key]

    def class_rows(self, state: dict[str, torch.Tensor]) -> list[ClassRow]:
        rows: dict[tuple[str, str], ClassRow] = {}
        for name, t in state.items():
            kind = export_kind(name, t, self.fmt, self.control, self.keep)
            key = (tensor_role(name, self.control), kind)
            row = rows.setdefault(key, ClassRow(*key, 0, 0, 0, self.ratio(key, name, t)))
            row.tensors += 1
            row.params += t.numel()
            row.stored += stored_bytes(kind, t)
        return sorted(rows.values(), key=lambda r: -r.stored)

    def container(self, state: dict[str, torch.Tensor]) -> int:
        """Compressed bytes of everything but the tensor data: an all-zero state serialized for real,
        less what the codec makes of the zero data alone."""
        zeros = {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in state.items()}
        blob, _ = serialize(zeros, {}, self.fmt, self.control, self.keep)
        data = sum(stored_bytes(export_kind(k, t, self.fmt, self.control, self.keep), t) for k, t in state.items())
        return max(len(blob) - len(compress(bytes(data), self.codec)), 0)


def code_size(cfg: Hyperparameters, compressed: bool) -> int:
    from pgolf.pack import compressed_stub, packed_source

    source = packed_source(preset_diff(cfg))
    return len(compressed_stub(source) if compressed else source.encode("utf-8"))


def predict(planner: Planner, cfg: Hyperparameters, code: int, container_per_tensor: float | None = None) -> Prediction:
    """Bytes of cfg's artifact; the container is measured exactly unless a per-tensor rate is given."""
    state = model_shapes(cfg)
    container = planner.container(state) if container_per_tensor is None else round(container_per_tensor * len(state))
    return Prediction(planner.class_rows(state), container, code)


def largest_fitting(fits, lo: int, step: int = 1) -> int | None:
    """Largest value lo + k*step with fits(value), assuming fits is monotone (true, then false)."""
    if not fits(lo):
        return None
    hi = lo + step
    while fits(hi):  # double the stride until it overshoots
        lo, hi = hi, hi + 2 * (hi - lo)
    while hi - lo > step:  # invariant: fits(lo) and not fits(hi)
        mid = lo + (hi - lo) // (2 * step) * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def search_limits(planner: Planner, cfg: Hyperparameters, base: Prediction, limit: int = SIZE_LIMIT) -> dict:
    """Largest MLP hidden width (multiple of 64) and layer count whose predicted total fits in `limit`."""
    per_tensor = base.container / len(model_shapes(cfg))

    def total(**changes) -> int:
        return predict(planner, replace(cfg, **changes), base.code, per_tensor).total

    hidden = largest_fitting(lambda h: total(mlp_mult=h / cfg.model_dim) <= limit, 64, 64)
    layers = largest_fitting(lambda n: total(num_layers=n) <= limit, 1)
    return {"mlp_hidden": hidden, "mlp_total": hidden and total(mlp_mult=hidden / cfg.model_dim),
            "num_layers": layers, "layers_total": layers and total(num_layers=layers)}


def format_prediction(pred: Prediction, planner: Planner) -> list[str]:
    lines = [f"{'class':<10} {'kind':<11} {'tensors':>7} {'params':>12} {'bits nominal':>12} {'bits stored':>11} "
             f"{'ratio':>6} {'bits packed':>11} {'predicted bytes':>15}  ratio basis"]
    for r in pred.rows:
        lines.append(f"{r.role:<10} {r.kind:<11} {r.tensors:>7} {r.params:>12,} {NOMINAL_BITS.get(r.kind, 0):>12} "
                     f"{8 * r.stored / r.params:>11.2f} {r.ratio:>6.3f} {8 * r.compressed / r.params:>11.2f} "
                     f"{r.compressed:>15,}  {planner.basis[(r.role, r.kind)]}")
    lines.append(f"{'container':<10} {'':<11} {'':>7} {'':>12} {'':>12} {'':>11} {'':>6} {'':>11} {pred.container:>15,}"
                 "  all-zero state serialized")
    stored = sum(r.stored for r in pred.rows)
    lines.append(f"{'model':<10} {planner.fmt:<11} {sum(r.tensors for r in pred.rows):>7} {pred.params:>12,} {'':>12} "
                 f"{8 * stored / pred.params:>11.2f} {pred.model / stored:>6.3f} {8 * pred.model / pred.params:>11.2f} "
                 f"{pred.model:>15,}")
    return lines


def budget_command(argv: list[str]) -> int:
    from pgolf.options import command_parser, parse_with_settings

    parser = command_parser("pgolf budget", __doc__, settings=True)
    parser.add_argument("--calibrate", metavar="ARTIFACT", help="measure the ratios on a real run's artifact (.ptz)")
    parser.add_argument("--calibrate-bytes", type=int, metavar="N", help="v2 exports: N = the real bytes of this "
                        "preset's own export (e.g. a record log's 'Serialized model' line); scales the prediction")
    parser.add_argument("--compress", action="store_true", help="count the compressed train_gpt.py stub as the code")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-width / largest-depth search")
    args, flags = parse_with_settings(parser, argv)
    cfg = resolve(args.preset, env={}, flags=flags)
    if uses_v2(cfg):
        return budget_v2(cfg, args, flags)
    if args.calibrate_bytes:
        parser.error("--calibrate-bytes applies to v2 exports (MATRIX_QUANT, EMBED_BITS, *_CLIP_SIGMAS, LQER_ENABLED "
                     "or COMPRESSOR set); for this export use --calibrate ARTIFACT")
    planner = Planner(cfg, args.calibrate)
    pred = predict(planner, cfg, code_size(cfg, args.compress))
    hidden = int(round(cfg.mlp_mult * cfg.model_dim))
    overrides = "".join(f" --{k}={v}" for k, v in flags.items())
    print(f"budget: preset {args.preset}{overrides}: {cfg.num_layers} layers x {cfg.model_dim}, "
          f"MLP hidden {hidden}, vocab {cfg.vocab_size}, export {cfg.quant_format} ({planner.codec})")
    print("\n".join(format_prediction(pred, planner)))
    if planner.warning:
        print(planner.warning)
    print(f"basis: compressed = stored x ratio per class; ratios measured with {planner.codec} on weights quantized "
          + (f"as {cfg.quant_format} from {args.calibrate}" if args.calibrate else
             "from random-normal rows (std 1) of each class's width; trained weights differ, see docs/submission.md"))
    code_what = CODE_WHAT[args.compress]
    status = "OK" if pred.total <= SIZE_LIMIT else f"OVER BUDGET by {pred.total - SIZE_LIMIT:,}"
    print(f"model {pred.model:,} + code {pred.code:,} ({code_what}) = total {pred.total:,} bytes; "
          f"headroom {SIZE_LIMIT - pred.total:,} of {SIZE_LIMIT:,} ({status})")
    from pgolf.ttt_cost import ttt_budget_line
    print(ttt_budget_line(cfg))
    from pgolf.projection import projection_lines

    print("\n".join(projection_lines(cfg)))
    if not args.no_search:
        found = search_limits(planner, cfg, pred)
        if found["mlp_hidden"]:
            print(f"largest MLP width that fits: hidden {found['mlp_hidden']} (mlp_mult "
                  f"{found['mlp_hidden'] / cfg.model_dim:g}, multiple of 64) -> {found['mlp_total']:,} bytes")
        else:
            print("largest MLP width that fits: none (even hidden 64 is over)")
        if found["num_layers"]:
            print(f"largest layer count that fits: {found['num_layers']} (at MLP hidden {hidden}) -> "
                  f"{found['layers_total']:,} bytes")
        else:
            print("largest layer count that fits: none (even 1 layer is over)")
    return 0 if pred.total <= SIZE_LIMIT else 1


def budget_v2(cfg: Hyperparameters, args, flags: dict) -> int:
    """The v2 prediction (pgolf.export_budget): a real export of a synthetic state, optionally calibrated."""
    overrides = "".join(f" --{k}={v}" for k, v in flags.items())
    print(f"budget: preset {args.preset}{overrides}: {cfg.num_layers} layers x {cfg.model_dim}, vocab "
          f"{cfg.vocab_size}; export v2: MATRIX_QUANT={cfg.matrix_quant} MATRIX_BITS={cfg.matrix_bits} "
          f"EMBED_BITS={cfg.embed_bits} clips attn/mlp/embed {cfg.attn_clip_sigmas}/{cfg.mlp_clip_sigmas}/"
          f"{cfg.embed_clip_sigmas} LQER={'rank %d top %d' % (cfg.lqer_rank, cfg.lqer_top_k) if cfg.lqer_enabled else 'off'} "
          f"COMPRESSOR={cfg.compressor}")
    pred = predict_config(cfg)
    params = sum(t.numel() for t in model_shapes(cfg).values())
    print("\n".join(format_groups(pred)))
    print(f"lrzip: {pred.groups.get('lrzip', 'not used (single-stream compressor)')}")
    print(f"synthetic export: {pred.bytes:,} bytes for {params:,} parameters ({8 * pred.bytes / params:.3f} bits each), "
          f"{pred.lqer_tensors} LQER tensors, {pred.seconds:.1f}s")
    model, basis = pred.bytes, ("random-normal weights (std 1) exported for real; GPTQ predicted by rounding to "
                                "nearest on the same grid; trained weights usually compress better (--calibrate)")
    if args.calibrate:
        factor, detail = calibrate(args.calibrate, split_patterns(cfg.control_tensor_name_patterns),
                                   split_patterns(cfg.fp16_passthrough_patterns))
        model, basis = round(pred.bytes * factor), f"calibrated on {detail}"
    elif args.calibrate_bytes:
        own = pred if not flags else predict_config(resolve(args.preset, env={}, flags={}))
        factor = args.calibrate_bytes / own.bytes
        model = round(pred.bytes * factor)
        basis = (f"calibrated on {args.calibrate_bytes:,} real bytes of preset {args.preset}'s export vs "
                 f"{own.bytes:,} predicted for it -> factor {factor:.4f}")
    print(f"basis: {basis}")
    code = code_size(cfg, args.compress)
    total = model + code
    status = "OK" if total <= SIZE_LIMIT else f"OVER BUDGET by {total - SIZE_LIMIT:,}"
    print(f"model {model:,} + code {code:,} ({CODE_WHAT[args.compress]}) = total {total:,} bytes; "
          f"headroom {SIZE_LIMIT - total:,} of {SIZE_LIMIT:,} ({status})")
    return 0 if total <= SIZE_LIMIT else 1
