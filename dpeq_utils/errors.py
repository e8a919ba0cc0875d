"""``DpeqError``: the base of every error a user can cause and fix (a bad value, a missing or corrupt
file, a record that does not verify, no room, a run already in progress). Its message says what to
do; every command prints it as one sentence (:func:`dpeq_utils.cli.user_errors`). Each subclass also
derives from the built-in error it refines (``ValueError``, ``RuntimeError``), so code that catches
those keeps working."""


class DpeqError(Exception):
    """A foreseeable, fixable error; its message tells the user what to do."""
