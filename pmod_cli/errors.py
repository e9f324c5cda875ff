"""Errors a user can cause (recipes, paths, data, flags).

The CLI turns a ``UserError`` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names it and, where possible, the fix."""
