"""One exception type for mistakes a user can fix, and the wrapper that turns it
into a single plain sentence instead of a traceback."""
import functools
import os
import re
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoint) and how to fix it."""


def reason(e: BaseException) -> str:
    """`Type: first sentence of its text` (200 characters at most), to put in parentheses
    in a UserError's one sentence; the class name alone when the text is empty (an
    EOFError of an empty file). torch.load's weights_only refusal opens with paragraphs of
    advice (including to disable the check) and names the actual cause on a later line,
    after "WeightsUnpickler error:": that cause is taken."""
    text = str(e)
    unpickler = text.find("WeightsUnpickler error:")
    if unpickler >= 0:
        text = text[unpickler + len("WeightsUnpickler error:"):]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    first = re.split(r"(?<=[.!?]) ", lines[0])[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"


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
