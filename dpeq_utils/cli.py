"""What every dpeq command line shares: its options (parent parsers, declared once here) and its
errors: a foreseeable one (:class:`dpeq_utils.errors.DpeqError`, or a bad value, a missing file, no
permission) becomes one clear sentence and an exit code; tracebacks are for bugs, or on request
(``--debug`` or ``DPEQ_DEBUG=1``). The commands are reached through ``python -m dpeq_utils <command>``
(:mod:`dpeq_utils.__main__`)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import contextmanager

from .errors import DpeqError

#: Errors a user can cause and fix: their messages say what to do. Anything else is a bug and keeps
#: its traceback.
FORESEEN = (DpeqError, ValueError, FileNotFoundError, PermissionError, OSError)


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
    except FORESEEN as err:
        if debugging(debug):
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        if not debugging(debug):
            print(f"{prog}: (for the traceback: --debug or DPEQ_DEBUG=1)", file=sys.stderr)
        raise CommandFailed(1) from None


# ---------------------------------------------------------------------------------- shared options


def _debug_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show tracebacks of foreseeable errors too")
    return parent


def _profile_options(default: str, runs_dir: bool) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--profile", default=default,
                        help=f"smoke, teach, paper, or a path to a profile .yaml (default: {default})")
    if runs_dir:
        parent.add_argument("--runs-dir", default=None,
                            help="your records' folder (default: data/runs/<profile>); the shipped records in "
                                 "data/reference/<profile> are read first")
    return parent


def _config_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--baseline", default=None, metavar="NAME",
                        help="apply the profile's baselines[NAME] entry, e.g. de_et_al_eps8 under --profile paper")
    parent.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config field (repeatable), e.g. --set target_epsilon=3")
    return parent


def _record_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--write-reference", action="store_true",
                        help="allow writing into a folder of shipped records (data/reference/): only to extend "
                             "the shipped study on purpose; each new record is added to the manifest")
    parent.add_argument("--resume-other-code", action="store_true",
                        help="continue checkpoints written by other dpeq code (each record then lists every code "
                             "version it was trained with); without it such a checkpoint is refused with a message")
    return parent


def command_parser(command: str, description: str, *, profile: str | None = None, runs_dir: bool = True,
                   config: bool = False, records: bool = False) -> argparse.ArgumentParser:
    """The parser of ``python -m dpeq_utils <command>`` with the options it shares with the others:
    always ``--debug``; with a ``profile`` default, ``--profile`` (and ``--runs-dir`` unless
    ``runs_dir=False``); ``config``: ``--baseline``, ``--set``; ``records`` (it writes run records):
    ``--write-reference``, ``--resume-other-code``."""
    parents = [_debug_options()]
    if profile is not None:
        parents.append(_profile_options(profile, runs_dir))
    if config:
        parents.append(_config_options())
    if records:
        parents.append(_record_options())
    return argparse.ArgumentParser(prog=f"python -m dpeq_utils {command}", description=description, parents=parents)


def base_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The run config ``--profile``, ``--baseline`` and ``--set`` describe; a bad one is a usage error."""
    from .config import config_from_profile, parse_assignment

    try:
        return config_from_profile(args.profile, args.baseline, **dict(parse_assignment(a) for a in args.assignments))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
