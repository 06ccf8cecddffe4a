"""The ``graphc`` command line.

Each subcommand lives in its own module ``graphc.cli.<name>`` exposing

* ``HELP``: a one-line description,
* ``add_arguments(parser)``: its flags,
* ``run(args) -> int``: the work, returning the exit status.

:data:`COMMANDS` is the registry; adding a command is adding a module and one line here.
A :class:`~graphc.errors.GraphcError` from any command is printed as one line
(``error: <file>: <field>: <what>``) with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from graphc.errors import GraphcError

COMMANDS = ["prepare", "eval", "train", "grad", "generate", "export", "validate", "compile", "serve", "engine"]


def _load(name: str):
    return importlib.import_module(f"graphc.cli.{name.replace('-', '_')}")


def build_parser(available: list[str] | None = None) -> argparse.ArgumentParser:
    from graphc import __version__

    parser = argparse.ArgumentParser(prog="graphc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"graphc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in available if available is not None else COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as e:  # a command not written yet in this checkout
            if e.name == f"graphc.cli.{name}":
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs per worker
    try:
        return int(args._module.run(args) or 0)
    except GraphcError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
