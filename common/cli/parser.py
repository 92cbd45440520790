"""The scripts' argparse parser: its help format, the record of the flags the command line
typed (`given`), and `switch`, the one way an on/off flag is made (--x / --no-x)."""
import argparse
import sys
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each default shown once: argparse's value where the help text does not
    already say it, on/off for a switch, nothing for computed defaults (None: the help says
    how they are chosen)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, "") or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(action.default, bool):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' help format, which also records the flags the command
    line gave (`args.given_flags`, their dests): a preset such as --recipe small must keep
    a typed value even when it equals the default, and only argparse knows which were typed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extras = super().parse_known_args(argv, namespace)
        # argparse fills a default only where the namespace lacks the attribute, so a
        # namespace pre-filled with markers keeps a dest's marker exactly when no flag set it
        # (the dests from the actions: parsing [] fails on a required positional); an
        # append action copies its list before it appends, so a list marker tells it too
        markers = {d: object() for d in self._defaults}
        for a in self._actions:
            if a.dest is not argparse.SUPPRESS:
                appends = isinstance(a, (argparse._AppendAction, argparse._AppendConstAction))
                markers[a.dest] = [] if appends else markers.get(a.dest, object())
        markers.pop("given_flags", None)
        probe, _ = super().parse_known_args(argv, argparse.Namespace(**markers))
        parsed.given_flags = sorted(d for d, marker in markers.items() if getattr(probe, d) is not marker)
        return parsed, extras


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the command line set `dest` (see ArgumentParser)."""
    return dest in args.given_flags


class ArgumentAdder(Protocol):
    """A parser or one of its argument groups: where a shared flag may be added."""

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...


def switch(group: ArgumentAdder, *names: str, default: Optional[bool] = False, help: str,
           dest: Optional[str] = None) -> argparse.Action:
    """An on/off flag, every one alike: --x turns it on, --no-x off (argparse's
    BooleanOptionalAction). `default` None: the script decides when neither is given."""
    kwargs: Dict[str, Any] = {"dest": dest} if dest else {}
    return group.add_argument(*names, default=default, action=argparse.BooleanOptionalAction, help=help, **kwargs)


# Help texts a script words its own way, by dest (e.g. {"lr": "base learning rate: ..."}): the
# flag keeps its one definition in common/cli/, and a script never edits argparse's actions
Helps = Mapping[str, str]
NO_HELPS: Helps = MappingProxyType({})

# (option strings, add_argument keywords) of flags a script adds to a shared group
FlagSpec = Tuple[Tuple[str, ...], Dict[str, Any]]
