"""Power of the one-run audit's two ε lower bounds on Gaussian mechanisms of known ε.

    python benchmarks/audit_power.py                       # ε = 2, 4, 8; m = 1,000 and 5,000; 50 draws each
    python benchmarks/audit_power.py --epsilons 4 --canaries 1000 --trials 5

Canary i releases 1[included] + N(0, σ²), with σ set so that the Gaussian mechanism is exactly
(ε, δ)-DP for each canary's membership (:func:`dpeq_utils.audit.gaussian_mu`); its score is that
release. For each (ε, m) the script draws the inclusion flags and the noise ``--trials`` times, runs
:func:`dpeq_utils.audit.best_audit` with every conversion of :data:`dpeq_utils.audit.BOUNDS` on the
same scores, and prints their median and largest bound beside the true ε (which no sound 95 % bound
should exceed in more than about 5 % of draws), then a markdown table (docs/dp.md quotes it).
"""

import argparse
import sys

import numpy as np

from dpeq_utils.audit import BOUNDS, best_audit, gaussian_epsilon, gaussian_mu


def power(epsilon: float, canaries: int, trials: int, delta: float, seed: int) -> dict:
    sigma = 1 / gaussian_mu(epsilon, delta)
    rng = np.random.default_rng([seed, canaries, int(round(epsilon * 1000))])
    bounds = {name: [] for name in BOUNDS}
    for _ in range(trials):
        included = rng.random(canaries) < 0.5
        scores = included + rng.normal(0.0, sigma, canaries)
        for name in BOUNDS:
            bounds[name].append(best_audit(scores, included, delta, 0.95, bound=name, rng=rng).epsilon_lower_bound)
    return {"epsilon": epsilon, "true": gaussian_epsilon(sigma, delta), "sigma": sigma, "canaries": canaries,
            "bounds": {name: np.asarray(values) for name, values in bounds.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--canaries", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for epsilon in args.epsilons:
        for canaries in args.canaries:
            row = power(epsilon, canaries, args.trials, args.delta, args.seed)
            rows.append(row)
            print(f"ε = {epsilon:g} (σ = {row['sigma']:.4f}, true ε {row['true']:.4f}), m = {canaries}: "
                  + "; ".join(f"{name} median {np.median(b):.3f}, max {b.max():.3f}, above the true ε {int((b > row['true']).sum())}"
                              f"/{len(b)}" for name, b in row["bounds"].items()), flush=True)
    names = list(BOUNDS)
    print(f"\n95 % lower bounds, median (largest) over {args.trials} draws, δ = {args.delta:g}\n")
    print("| true ε | m | " + " | ".join(names) + " | draws above the true ε |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for row in rows:
        above = sum(int((b > row["true"]).sum()) for b in row["bounds"].values())
        print(f"| {row['true']:.2f} | {row['canaries']:,} | "
              + " | ".join(f"{np.median(row['bounds'][n]):.2f} ({row['bounds'][n].max():.2f})" for n in names) + f" | {above} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
