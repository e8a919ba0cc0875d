"""What every dpeq command line shares: foreseeable errors become one clear sentence and an exit
code; tracebacks are for bugs, or on request (``--debug`` or ``DPEQ_DEBUG=1``)."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

#: Errors a user can cause and fix (bad values, missing or corrupt data or records, no room, no GPU):
#: their messages say what to do. Anything else is a bug and keeps its traceback.
FORESEEN = (ValueError, FileNotFoundError, PermissionError, OSError)


def foreseen_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .preflight import PreflightError
    from .privacy import PrivacyBudgetError
    from .runs import RecordError, RunLocked
    from .shipped import ShippedRecordError

    return (CheckpointError, DatasetError, PreflightError, PrivacyBudgetError, RecordError, RunLocked,
            ShippedRecordError) + FORESEEN


def debugging(flag: bool = False) -> bool:
    return flag or os.environ.get("DPEQ_DEBUG", "") not in ("", "0")


class CommandFailed(SystemExit):
    """Raised by :func:`user_errors` after printing the message; its code is the exit status."""


@contextmanager
def user_errors(prog: str, debug: bool = False):
    """Inside this block a foreseen error prints ``prog: error: message`` and exits 1; Ctrl-C exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise CommandFailed(130) from None
    except foreseen_errors() as err:
        if debugging(debug):
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        if not debugging(debug):
            print(f"{prog}: (for the traceback: --debug or DPEQ_DEBUG=1)", file=sys.stderr)
        raise CommandFailed(1) from None


def add_record_options(parser) -> None:
    """The options every command that writes run records shares (train, study)."""
    parser.add_argument("--write-reference", action="store_true",
                        help="allow writing into a folder of shipped records (data/reference/): only to extend "
                             "the shipped study on purpose; each new record is added to the manifest")
    parser.add_argument("--resume-other-code", action="store_true",
                        help="continue checkpoints written by other dpeq code (each record then lists every code "
                             "version it was trained with); without it such a checkpoint is refused with a message")


def train_main(argv: list[str] | None = None) -> int:
    """Train one run of a profile and write its record (``python -m dpeq_utils.train``, ``dpeq-train``)."""
    import argparse

    from .config import config_from_profile, parse_assignment
    from .models import model_tag
    from .runs import find_record, load_or_run, record_path

    prog = "python -m dpeq_utils.train"
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Train one run of a profile and write its record. The last line printed is the record's path."))
    parser.add_argument("--profile", default="smoke", help="smoke, teach, paper, or a path to a profile .yaml")
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="apply the profile's baselines[NAME] entry, e.g. de_et_al_eps8 under --profile paper")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config field (repeatable), e.g. --set target_epsilon=3")
    parser.add_argument("--runs-dir", default=None, help="folder for the record (default: data/runs/<profile>)")
    parser.add_argument("--force", action="store_true",
                        help="train from step 0 even if a record or a checkpoint of this config exists")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from this run's checkpoint if there is one (default); --no-resume starts over")
    add_record_options(parser)
    parser.add_argument("--force-memory", action="store_true",
                        help="train even if the run's estimated memory exceeds what is available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of foreseeable errors too")
    args = parser.parse_args(argv)
    try:
        config = config_from_profile(args.profile, args.baseline, **dict(parse_assignment(a) for a in args.assignments))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    with user_errors(prog, args.debug):
        found = None if args.force else find_record(config, args.runs_dir)
        record = load_or_run(config, runs_dir=args.runs_dir, force=args.force, progress=not args.no_progress,
                             force_memory=args.force_memory, resume=args.resume,
                             resume_other_code=args.resume_other_code, write_reference=args.write_reference)
    eps = record["epsilon_spent"]
    origin = (f"read from {found} (trained {record.get('created', '?')} on {record['device']}, "
              f"{record['wall_time_s']:.0f} s then)" if found else f"{record['wall_time_s']:.1f} s on {record['device']}")
    print(f"{model_tag(config.model, config.group)} on {config.dataset}: "
          f"test accuracy {record['test_accuracy']:.3f} (EMA {record['test_accuracy_ema']:.3f}), "
          f"ε = {'∞ (non-private)' if eps is None else f'{eps:.3f} ≤ {config.target_epsilon}'}, "
          f"σ = {record['noise_multiplier']:.4g}, q = {record['sample_rate']:.4g}, {record['steps']} steps, "
          f"{record['num_params']} parameters; {origin}")
    print(found or record_path(config, args.runs_dir))
    return 0
