"""The challenge's acceptance rule: is a configuration better by at least `min_gain` nats, p < 0.01?

`pgolf significance A_RUNS... --vs B_RUNS...` runs a one-sided Welch t-test of
H0: mean_B - mean_A <= min_gain against H1: mean_B - mean_A > min_gain on the runs' final val_loss
(lower is better, A is the candidate). `--vs-value X` tests against a published mean X instead
(one-sample t-test, df = n_A - 1). The Student-t tail comes from the regularized incomplete beta
function, evaluated by its continued fraction (no scipy needed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pgolf.options import command_parser

ALPHA = 0.01
DEFAULT_MIN_GAIN = 0.005  # nats, the challenge's record margin
_CF_EPS, _CF_TINY, _CF_MAX_ITER = 1e-15, 1e-300, 10_000


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
    h = d
    for m in range(1, _CF_MAX_ITER):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _CF_TINY else _CF_TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _CF_TINY else _CF_TINY
            h *= c * d
        if abs(c * d - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and x in [0, 1] (got a={a}, b={b}, x={x})")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b  # the symmetric form converges there


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df > 0 degrees of freedom (df need not be an integer)."""
    if df <= 0 or math.isnan(t):
        raise ValueError(f"t_sf needs df > 0 and a number t (got t={t}, df={df})")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for one value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


@dataclass
class SignificanceResult:
    gain: float  # mean improvement in nats (B - A, or value - A)
    t: float
    df: float
    p: float

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.p < alpha


def _p_value(excess: float, se: float, df: float) -> tuple[float, float]:
    if se == 0.0:  # identical values in every run: the sign of the excess decides
        t = math.copysign(math.inf, excess) if excess else 0.0
        return t, (0.0 if excess > 0 else 1.0 if excess < 0 else 0.5)
    t = excess / se
    return t, t_sf(t, df)


def welch_improvement(a: list[float], b: list[float], min_gain: float) -> SignificanceResult:
    """One-sided Welch test that mean(b) - mean(a) > min_gain (a: candidate losses, b: reference)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a t-test needs at least 2 runs per group (got {len(a)} and {len(b)})")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1)) if se > 0 else float(len(a) + len(b) - 2)
    t, p = _p_value(mb - ma - min_gain, se, df)
    return SignificanceResult(gain=mb - ma, t=t, df=df, p=p)


def improvement_over_value(a: list[float], value: float, min_gain: float) -> SignificanceResult:
    """One-sided one-sample test that value - mean(a) > min_gain."""
    if len(a) < 2:
        raise ValueError(f"a t-test needs at least 2 runs (got {len(a)})")
    ma, sa = mean_std(a)
    t, p = _p_value(value - ma - min_gain, sa / math.sqrt(len(a)), len(a) - 1.0)
    return SignificanceResult(gain=value - ma, t=t, df=len(a) - 1.0, p=p)


def _describe(name: str, runs) -> str:
    losses = [r.final["val_loss"] for r in runs]
    bpbs = [r.final["val_bpb"] for r in runs]
    (ml, sl), (mb, sb) = mean_std(losses), mean_std(bpbs)
    seeds = ", ".join(str(r.seed) for r in runs)
    return (f"{name}: {len(runs)} runs (seeds {seeds}) val_loss {ml:.5f} ± {sl:.5f}  val_bpb {mb:.5f} ± {sb:.5f}"
            + "".join(f"\n    {r.path}  val_loss {r.final['val_loss']:.5f}" for r in runs))


def _load_group(paths: list[str], name: str, what: str, hint: str) -> list:
    """A group's runs: at least 2, one configuration; prints its summary."""
    from pgolf.runs import check_same_config, load_runs

    runs = load_runs(paths)
    if len(runs) < 2:
        raise ValueError(f"a t-test needs at least 2 {what}, got {len(runs)} ({paths[0]}); {hint}")
    check_same_config(runs, f"group {name}")
    print(_describe(name, runs))
    return runs


def significance_command(argv: list[str]) -> int:
    """Exit code 0 when significant, 1 when not, 2 on bad input."""
    parser = command_parser("pgolf significance", __doc__)
    parser.add_argument("runs", nargs="+", help="run folders of the candidate configuration (A)")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument("--vs", nargs="+", metavar="RUN", help="run folders of the reference configuration (B)")
    ref.add_argument("--vs-value", type=float, metavar="X", help="a published reference mean val_loss")
    parser.add_argument("--min-gain-nats", type=float, default=DEFAULT_MIN_GAIN)
    args = parser.parse_args(argv)
    a = _load_group(args.runs, "A", "runs of the candidate", "run more seeds (pgolf seeds)")
    losses = [r.final["val_loss"] for r in a]
    if args.vs:
        b = _load_group(args.vs, "B", "reference runs", "or compare with a published mean via --vs-value")
        result = welch_improvement(losses, [r.final["val_loss"] for r in b], args.min_gain_nats)
        test, ref_name = "Welch t", "mean(B)"
    else:
        result = improvement_over_value(losses, args.vs_value, args.min_gain_nats)
        test, ref_name = "one-sample t", f"{args.vs_value:.5f}"
    print(f"improvement {ref_name} - mean(A): {result.gain:+.5f} nats (required: > {args.min_gain_nats:g})")
    print(f"{test} = {result.t:.3f}, df = {result.df:.2f}, one-sided p = {result.p:.3g}")
    if result.significant():
        print(f"verdict: SIGNIFICANT at p < {ALPHA}: A beats the reference by more than {args.min_gain_nats:g} nats")
        return 0
    print(f"verdict: NOT SIGNIFICANT at p < {ALPHA}")
    return 1
