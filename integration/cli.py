"""Command-line helpers shared by the scripts in ``integration/``.

Every script builds its parser in a ``build_parser()`` function (nothing runs) and
parses with ``parse_args(argv)``, so that tests can feed it bad values. The helpers
here keep their error messages in argparse's format: a bad value exits with status 2
and one line ``<prog>: error: argument --flag: <what is allowed>``.

Typical use::

    import cli

    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            description="What the script does.", formatter_class=cli.HelpFormatter
        )
        parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed runs")
        parser.add_argument("--device", type=cli.device, default="cpu", help="torch device")
        parser.add_argument("--quick", action="store_true", help="smoke-test settings")
        return parser

    def parse_args(argv=None) -> argparse.Namespace:
        parser = build_parser()
        args = parser.parse_args(argv)
        cli.reject_together(parser, argv, "--quick", ["--repeats"])
        return args

    def main(argv=None):
        cli.quiet_library_warnings()
        args = parse_args(argv)
        ...

Type functions (``positive_int``, ``nonnegative_int``, ``nonnegative_float``,
``int_at_least(k)``, ``device``, ``directory``, ``existing_file``) go in
``add_argument(type=...)``; they raise :class:`argparse.ArgumentTypeError`, which argparse
reports with the flag's name. ``add_data_dir(parser)`` adds the scripts' shared
``--data-dir`` option.
Checks that need several flags (``reject_together``, ``reject_duplicates``) run after
``parse_args`` and exit through ``parser.error``, with the same status and format.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

__all__ = [
    "LIBRARY_WARNINGS",
    "HelpFormatter",
    "available_devices",
    "device",
    "directory",
    "existing_file",
    "given_options",
    "int_at_least",
    "nonnegative_int",
    "positive_int",
    "quiet_library_warnings",
    "reject_duplicates",
    "reject_together",
]


# --------------------------------------------------------------------------------------
# Help text
# --------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Append ``(default: …)`` to every option's help; keep the description's layout.

    The default is shown unless it is ``None`` or ``False`` (an unset optional value or
    an off switch: say in the help what happens then) or the help already mentions
    ``default``. Lists and tuples are shown space-separated, as they are typed.
    The description and epilog are printed as written (line breaks kept).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or (
                not action.option_strings
                and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
            )
        ):
            return text
        if isinstance(default, list | tuple):
            shown = " ".join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


# --------------------------------------------------------------------------------------
# Types for add_argument(type=...)
# --------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Return an argparse type accepting integers ``≥ minimum``.

    Args:
        minimum: The smallest allowed value.

    Returns:
        A function ``str → int`` that raises :class:`argparse.ArgumentTypeError`
        ("expected an integer ≥ 5, got '2'") for anything else.
    """

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {minimum}, got {value!r}")
        return number

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def positive_int(value: str) -> int:
    """Argparse type: an integer ``≥ 1`` (counts of seeds, repeats, samples, threads).

    Raises:
        argparse.ArgumentTypeError: "expected a positive integer (1, 2, 3, …), got '0'".
    """
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1, 2, 3, …), got {value!r}")
    return number


def nonnegative_int(value: str) -> int:
    """Argparse type: an integer ``≥ 0`` (epochs, warm-up runs; 0 switches a step off).

    Raises:
        argparse.ArgumentTypeError: "expected a non-negative integer (0, 1, 2, …), got '-1'".
    """
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer (0, 1, 2, …), got {value!r}"
        )
    return number


def nonnegative_float(value: str) -> float:
    """Argparse type: a finite float ``≥ 0`` (tolerances, weight decay).

    Raises:
        argparse.ArgumentTypeError: "expected a non-negative number, got '-1'".
    """
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {value!r}")
    return number


def available_devices() -> list[str]:
    """Device strings :func:`device` accepts on this machine: ``cpu``, then CUDA ones.

    Returns:
        ``["cpu"]``, plus ``"cuda"`` and ``"cuda:0" … "cuda:<n-1>"`` when
        ``torch.cuda.is_available()``.
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def device(value: str) -> str:
    """Argparse type: a torch device the scripts support *and* this machine has.

    Accepted: ``cpu`` and, when ``torch.cuda.is_available()``, ``cuda`` or ``cuda:N``
    with ``N`` below ``torch.cuda.device_count()`` (the scripts synchronise CUDA
    only, so other backends would give wrong timings). Returns the string unchanged.

    Raises:
        argparse.ArgumentTypeError: For another kind of device (``tpu``, ``mps``, …)
            and for a CUDA device this machine does not have; the message lists the
            devices available here.
    """
    here = ", ".join(available_devices())
    match = _DEVICE.fullmatch(value)
    if match is None or (match.group(1) == "cpu" and match.group(2) not in (None, "0")):
        raise argparse.ArgumentTypeError(
            f"invalid device {value!r}: choose from cpu, cuda, cuda:N (available here: {here})"
        )
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"device {value!r} is not available: no CUDA device "
                f"(torch.cuda.is_available() is False; available here: {here})"
            )
        if match.group(2) is not None and int(match.group(2)) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"device {value!r} is not available: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (available here: {here})"
            )
    return value


def directory(value: str) -> Path:
    """Argparse type: a directory path, existing or not (it is created when needed).

    Raises:
        argparse.ArgumentTypeError: If the path exists and is not a directory.
    """
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} exists and is not a directory")
    return path


def existing_file(value: str) -> Path:
    """Argparse type: the path of an existing file.

    Raises:
        argparse.ArgumentTypeError: If there is no file at that path.
    """
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value!r}")
    return path


# --------------------------------------------------------------------------------------
# Checks after parsing
# --------------------------------------------------------------------------------------


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Option strings (``--repeats``, …) given explicitly in ``argv``.

    An option counts as given when it appears in ``argv`` in any accepted spelling
    (``--repeats 7``, ``--repeats=7``, an unambiguous prefix such as ``--rep 7``), even
    with its default value. Each option is reported by its first (canonical) option
    string, as passed to ``add_argument``.

    Args:
        parser: The parser ``argv`` was (successfully) parsed with.
        argv: The arguments, ``None`` for ``sys.argv[1:]`` (as for ``parse_args``).
    """
    unset = object()
    actions = [a for a in parser._actions if a.option_strings and a.dest != argparse.SUPPRESS]
    namespace = argparse.Namespace(**{a.dest: unset for a in actions})
    parser.parse_known_args(argv, namespace)
    return {a.option_strings[0] for a in actions if getattr(namespace, a.dest) is not unset}


def reject_together(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    option: str,
    others: Iterable[str],
    reason: str = "",
) -> None:
    """Exit (status 2) if ``option`` and any of ``others`` are both given explicitly.

    The message is argparse's own for mutually exclusive options:
    ``error: argument --repeats: not allowed with argument --quick``, then ``reason``.

    Args:
        parser: The parser (its ``error`` exits).
        argv: The parsed arguments, ``None`` for ``sys.argv[1:]``.
        option: The option that excludes the others (e.g. ``"--quick"``).
        others: Options not allowed together with it (e.g. ``["--repeats"]``), by the
            first option string passed to ``add_argument``.
        reason: Optional explanation appended to the message.
    """
    given = given_options(parser, argv)
    if option not in given:
        return
    for other in others:
        if other in given:
            suffix = f" ({reason})" if reason else ""
            parser.error(f"argument {other}: not allowed with argument {option}{suffix}")


def reject_duplicates(
    parser: argparse.ArgumentParser, option: str, values: Sequence | None
) -> None:
    """Exit (status 2) if a multi-valued option lists a value more than once.

    Args:
        parser: The parser (its ``error`` exits).
        option: The option's name for the message (e.g. ``"--datasets"``).
        values: The parsed values (``None`` is accepted and ignored).
    """
    seen = set()
    for value in values or ():
        if value in seen:
            parser.error(f"argument {option}: {value!r} is given more than once")
        seen.add(value)


# --------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------


LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch, once per backward pass through a BackPACK-extended model whose inputs do
    # not require gradients (always the case here): BackPACK's hooks need no input
    # gradients, so the warning says nothing about the scripts' results.
    ("Full backward hook is firing", UserWarning),
)
"""``(message regex, category)`` of the warnings :func:`quiet_library_warnings` hides."""


def write_report(out: Path, stem: str, result: dict, text: str) -> None:
    """Write ``result`` to ``out/<stem>.json`` and ``text`` to ``out/<stem>.md``; print ``text``.

    Creates ``out`` where it is missing.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


def quiet_library_warnings() -> None:
    """Hide the library warnings in :data:`LIBRARY_WARNINGS` for this process.

    Call it once at the start of a script's ``main``. Only these warnings are
    filtered (by message and category); every other warning is shown as before.
    Calling it again adds nothing.
    """
    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, where the UCI files not shipped by a package are read from."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        type=directory,
        default=None,
        help="directory of concrete.csv.gz/energy.csv.gz (default: $KFOC_DATA_DIR, "
        "else ../shared/data/uci relative to the repository)",
    )
