"""Does a shipped number repeat? Retrain shipped records with today's code on this machine and set
each difference beside the seed-to-seed spread (``python -m dpeq_utils verify``).

What to expect, and what this command checks:

- **same code, same kind of CPU** (the record's ``source_sha256`` and ``machine`` equal this
  process's): the rerun must be **bit for bit** the shipped record (every result field; timings and
  provenance aside);
- **other code or another kind of CPU** (or a record too old to name its code or CPU): rounding
  differs somewhere, training amplifies it, and the rerun is a statistically equivalent run: its
  difference from the shipped run should lie within the spread of the difference of two runs that
  differ only in their seed, ±t·√2·SD with SD the pooled seed-to-seed SD of one run over part A's
  models (:func:`dpeq_utils.report.seed_spread`; 95 %).

Records are chosen at random (``--sample N``, seeded by ``--seed``) or named by key (``--keys``).
Reruns are written to a temporary folder (``--out`` keeps them); the shipped records are only read.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
from pathlib import Path

from .study import Study

#: Record fields that are timings, provenance or bookkeeping: everything else is a result and must
#: repeat bit for bit when code and CPU are the same.
NOT_RESULTS = {"wall_time_s", "train_time_s", "created", "digest", "source", "git_commit", "source_sha256", "machine",
               "machine_history", "code_history", "resumed_at_steps", "versions", "device", "config"}


def results_of(record: dict, fields=None) -> dict:
    """A record's results (of ``fields`` only, if given): what a rerun of the same code on the same kind
    of CPU must reproduce exactly."""
    kept = {k: v for k, v in record.items() if k not in NOT_RESULTS and (fields is None or k in fields)}
    kept["history"] = [{k: v for k, v in h.items() if k not in ("elapsed_s", "eval_time_s")}
                       for h in record.get("history", [])]
    return kept


def shipped_records(study: Study) -> dict[str, dict]:
    """The profile's shipped run records (verified as they are read), each with its ``source`` path."""
    from .paths import reference_dir
    from .records import read_record

    return {(r := read_record(path))["key"]: {**r, "source": str(path)}
            for path in sorted(reference_dir(study.profile).glob("*.json"))}


def choose(study: Study, shipped: dict[str, dict], sample: int | None, keys: list[str] | None, seed: int) -> list[dict]:
    """The shipped records to retrain: those named by ``keys``, else ``sample`` of them at random."""
    if keys:
        unknown = [k for k in keys if k not in shipped]
        if unknown:
            raise ValueError(f"no shipped record of profile {study.profile} has key {', '.join(unknown)}; "
                             f"`python -m dpeq_utils study plan --profile {study.profile}` lists the study, and each "
                             "record's key is in its file name")
        return [shipped[k] for k in keys]
    if not shipped:
        raise ValueError(f"profile {study.profile} has no shipped records to verify")
    count = min(sample or 1, len(shipped))
    return [shipped[k] for k in random.Random(seed).sample(sorted(shipped), count)]


def verify(study: Study, chosen: list[dict], out: Path, echo=print) -> list[dict]:
    """Retrain each of ``chosen`` into ``out`` and compare; one row per record."""
    from scipy import stats

    from .config import RunConfig
    from .machine import machine_kind
    from .provenance import CODE
    from .report import seed_spread
    from .runs import run
    from .runtime import pick_device

    spread = seed_spread(study)
    band = None
    if spread:
        band = float(stats.t.ppf(0.975, spread["run"]["df"]) * math.sqrt(2) * spread["run"]["sd"])
    rows = []
    for record in chosen:
        config = RunConfig(**record["config"])
        echo(f"[verify] retraining {Path(record['source']).name} ({config.model}, {config.update_steps} steps, seed "
             f"{config.seed}) with today's code on this machine ...")
        rerun = run(config, runs_dir=out, progress=False)
        same_code = record.get("source_sha256") == CODE["source_sha256"]
        same_cpu = record.get("machine") == machine_kind(pick_device(config.device))
        shared = set(rerun) & set(record)  # a record older than a field has none to compare
        identical = results_of(rerun, shared) == results_of(record, shared)
        difference = rerun["test_accuracy_ema"] - record["test_accuracy_ema"]
        rows.append({"record": Path(record["source"]).name, "shipped": record["test_accuracy_ema"],
                     "rerun": rerun["test_accuracy_ema"], "difference": difference,
                     "in spread": None if band is None else abs(difference) <= band, "band": band,
                     "bit for bit": identical, "same code": same_code,
                     "same CPU": None if "machine" not in record else same_cpu,
                     "expected bit for bit": same_code and same_cpu})
        echo(_line(rows[-1]))
    return rows


def _line(row: dict) -> str:
    cpu = {None: "the record names no CPU", True: "same kind of CPU", False: "another kind of CPU"}[row["same CPU"]]
    code = "same code" if row["same code"] else "other code (or a record without a source hash)"
    verdict = ("bit for bit, as expected" if row["bit for bit"] and row["expected bit for bit"] else
               "NOT bit for bit although code and CPU are the same" if row["expected bit for bit"] else
               "bit for bit" if row["bit for bit"] else "a different run, as expected with " + code + " / " + cpu)
    spread = ("" if row["band"] is None else
              f"; {'within' if row['in spread'] else 'OUTSIDE'} the seed spread of a difference of two runs "
              f"(±{100 * row['band']:.1f} points, 95 %)")
    return (f"  {row['record']}: EMA test accuracy {100 * row['shipped']:.2f} % shipped, {100 * row['rerun']:.2f} % "
            f"now ({100 * row['difference']:+.2f} points){spread}; {code}, {cpu}: {verdict}")


def main(argv: list[str] | None = None) -> int:
    from .cli import command_parser, user_errors

    parser = command_parser("verify", __doc__.split("\n\n")[0], profile="teach")
    parser.add_argument("--sample", type=int, default=None, help="how many shipped records to retrain, chosen at random")
    parser.add_argument("--keys", nargs="+", default=None, help="or: the keys of the records to retrain")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random choice (default 0)")
    parser.add_argument("--out", default=None, help="keep the reruns' records here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be at least 1")
    with user_errors(parser.prog, args.debug):
        study = Study(args.profile)
        chosen = choose(study, shipped_records(study), args.sample, args.keys, args.seed)
        with tempfile.TemporaryDirectory() as scratch:
            rows = verify(study, chosen, Path(args.out) if args.out else Path(scratch), echo=lambda m: print(m, flush=True))
    failed = [r for r in rows if r["expected bit for bit"] and not r["bit for bit"]]
    print(f"{len(rows)} record(s) retrained: {sum(r['bit for bit'] for r in rows)} bit for bit, "
          f"{sum(bool(r['in spread']) for r in rows)} within the seed spread"
          + (f"; {len(failed)} not bit for bit although code and CPU are the same" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
