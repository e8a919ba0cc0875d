"""Power of the one-run audit's ε lower bounds on Gaussian mechanisms of known ε, and how often
they are positive on scores that carry no information.

    python benchmarks/audit_power.py                       # ε = 2, 4, 8; m = 1,000 and 5,000; 50 draws each; 2,000 null draws
    python benchmarks/audit_power.py --epsilons 4 --canaries 1000 --trials 5 --null-trials 0

Canary i releases 1[included] + N(0, σ²), with σ set so that the Gaussian mechanism is exactly
(ε, δ)-DP for each canary's membership (:func:`dpeq_utils.audit.gaussian_mu`); its score is that
release. For each (ε, m) the script draws the inclusion flags and the noise ``--trials`` times, runs
:func:`dpeq_utils.audit.best_audit` with every conversion of :data:`dpeq_utils.audit.BOUNDS` on the
same scores, and prints their median and largest bound beside the true ε (which no sound 95 % bound
should exceed in more than about 5 % of draws), then a markdown table (docs/dp.md quotes it).

Then the null: ``--null-trials`` draws of m = 1,000 canaries whose scores are independent of
membership (ε = 0), and in how many of them each 95 % bound is positive, with the choice among
guess sizes paid for (:func:`best_audit`) and without (the best of the six sizes, each at 95 %).
"""

import argparse
import sys

import numpy as np

from dpeq_utils.audit import BOUNDS, best_audit, gaussian_epsilon, gaussian_mu, one_run_audit


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


def null_rates(trials: int, canaries: int, delta: float, seed: int) -> tuple[dict, dict]:
    """Per bound: draws with a positive bound, the selection paid for and not."""
    rng = np.random.default_rng([seed, 0])
    sizes = sorted({max(1, int(f * canaries)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)})
    corrected, uncorrected = dict.fromkeys(BOUNDS, 0), dict.fromkeys(BOUNDS, 0)
    for _ in range(trials):
        included, scores = rng.random(canaries) < 0.5, rng.normal(size=canaries)
        for name in BOUNDS:
            corrected[name] += best_audit(scores, included, delta, 0.95, bound=name).epsilon_lower_bound > 0
            uncorrected[name] += max(one_run_audit(scores, included, k, k, delta, 0.95, bound=name).epsilon_lower_bound
                                     for k in sizes) > 0
    return corrected, uncorrected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--canaries", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--null-trials", type=int, default=2000)
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
    if args.null_trials:
        corrected, uncorrected = null_rates(args.null_trials, 1000, args.delta, args.seed)
        print(f"\nScores independent of membership, m = 1,000, {args.null_trials} draws: 95 % bound positive in\n")
        print("| bound | best of six sizes, Bonferroni (best_audit) | best of six sizes, each at 95 % |")
        print("|---|---|---|")
        for name in names:
            print(f"| {name} | {corrected[name]} ({100 * corrected[name] / args.null_trials:.1f} %) | "
                  f"{uncorrected[name]} ({100 * uncorrected[name] / args.null_trials:.1f} %) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
