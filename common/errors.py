"""One exception type for mistakes a user can fix, and the wrapper that turns it
into a single plain sentence instead of a traceback."""
import functools
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoint) and how to fix it."""


def report_user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn`; a UserError prints `<script>: error: <sentence>` and exits with status 2.

    Used around `main()` and around every spawned worker, so the message is the same
    whether the problem is found before or after the workers start.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            prog = os.path.basename(sys.argv[0]) or "python"
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
