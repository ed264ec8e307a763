"""The one exception type for a user's mistake: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a malformed file, a missing key, a bad argument).

    The message must name the file, demo and key involved; no traceback is shown for it.
    """
