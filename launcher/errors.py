"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, incompatible combination).

    Entry points print its message, exit with status 2 and show no traceback.
    """

    exit_code = 2
