"""Summary statistics of the quality benchmark: mean and sample standard deviation over seeds, and
the paired difference of two methods with a Student-t interval (no scipy).

Paired difference: for the seeds both methods finished, ``d_s = acc_A(s) - acc_B(s)`` (the same
batches, head initialisation and dropout masks for both in seed ``s``, so the seed-to-seed
variation they share cancels). The interval is ``mean(d) ± t(0.975, n-1) * sd(d) / sqrt(n)``, a
95% t-interval over the n paired differences; it assumes the ``d_s`` are independent draws from
a normal distribution. With 3 seeds it has 2 degrees of freedom, ``t = 4.303``.

Worked example: ``d = [0.02, 0.04, 0.03]`` gives mean 0.03, sd 0.01, standard error
``0.01 / sqrt(3) = 0.00577``, half-width ``4.303 * 0.00577 = 0.0248``: the interval
``[0.0052, 0.0548]``, which excludes 0.
"""

from __future__ import annotations

import math
import statistics


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (regularised incomplete beta)."""
    if x == 0:
        return 0.5
    z = df / (df + x * x)
    tail = 0.5 * _betainc(df / 2, 0.5, z)
    return 1 - tail if x > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (``t_quantile(0.975, 2) = 4.303``), by bisection."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile({p}, {df})")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * f / a


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict | None:
    """The paired difference ``a - b`` over the seeds both have, with its ``level`` t-interval
    (see the module docstring); None with fewer than 2 common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = mean_std(d)
    t = t_quantile(0.5 + level / 2, len(d) - 1)
    half = t * sd / math.sqrt(len(d))
    return {"seeds": seeds, "diffs": d, "mean": mean, "sd": sd, "df": len(d) - 1, "t": t, "half": half,
            "lo": mean - half, "hi": mean + half}
