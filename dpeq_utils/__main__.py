"""One front door: ``python -m dpeq_utils <command> [options]`` (console script ``dpeq``).

Each command is the module's own command line, reached by name; ``python -m dpeq_utils.<module>``
and the older console scripts (``dpeq-train``, ``dpeq-reproduce``) stay as aliases. Nothing in the
package imports this module, so it may import every command.
"""

from __future__ import annotations

import sys

#: command → (module, function, what it does)
COMMANDS = {
    "train": ("dpeq_utils.runs", "main", "train one run of a profile and write its record"),
    "study": ("dpeq_utils.study", "main", "plan or run the evidence study of a profile"),
    "sweep": ("dpeq_utils.sweep", "main", "a grid of runs locally or on Slurm; `sweep status RUNS_DIR`"),
    "report": ("dpeq_utils.report", "main", "rebuild the README's results block and figure from the records"),
    "verify": ("dpeq_utils.verify", "main", "retrain shipped records with today's code: bit for bit, or within the seed spread?"),
    "reproduce": ("dpeq_utils.reproduce", "main", "execute the notebooks under a profile (papermill)"),
    "benchmark": ("dpeq_utils.benchmark", "main", "what a DP step costs on this machine"),
    "manifest": ("dpeq_utils.shipped", "main", "rewrite data/reference/MANIFEST.json after adding shipped records"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: python -m dpeq_utils <command> [options]   (<command> --help for its options)\n\ncommands:\n" + \
        "\n".join(f"  {name:{width}s}  {what}" for name, (_, _, what) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m dpeq_utils: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return int(getattr(importlib.import_module(module), function)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
