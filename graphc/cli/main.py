"""The ``graphc`` command line.

Each subcommand lives in its own module ``graphc.cli.<name>`` exposing

* ``HELP``: a one-line description,
* ``add_arguments(parser)``: its flags,
* ``run(args) -> int``: the work, returning the exit status.

:data:`COMMANDS` is the registry; adding a command is adding a module and one line here.
A :class:`~graphc.errors.GraphcError` from any command is printed as one line
(``error: <file>: <field>: <what>``) with exit status 2 and no traceback; so are flag
errors (:class:`OneLineParser`: the usage block only with ``--help``), bad environment
variables (:mod:`graphc.cli.environment`), a too-old onnx/onnxruntime
(:mod:`graphc.versions`) and OS errors while reading or writing (a full disk, a read-only
file system). SIGINT exits 130 and SIGTERM 143, each with one line.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from graphc.errors import GraphcError

COMMANDS = ["prepare", "eval", "train", "grad", "generate", "export", "validate", "compile", "compare", "serve", "engine"]


def _load(name: str):
    return importlib.import_module(f"graphc.cli.{name.replace('-', '_')}")


class UsageError(GraphcError):
    """A flag argparse refused: ``error: graphc train: --lr: invalid float value: 'x'``."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage block is for ``--help``)."""

    def error(self, message: str):
        field = None
        if message.startswith("argument ") and ": " in message:
            field, message = message[len("argument "):].split(": ", 1)
            field = field.split("/")[0]
        raise UsageError(self.prog, message, field)


class Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself: checkpoint, then exit)."""


def _terminate(signum, frame):
    raise Terminated()


def build_parser(available: list[str] | None = None) -> argparse.ArgumentParser:
    from graphc import __version__

    parser = OneLineParser(prog="graphc", description=__doc__.split("\n\n")[0])
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
    from graphc.cli.environment import check_environment
    from graphc.outputs import os_error_line
    from graphc.versions import check_versions

    previous = _install(signal.SIGTERM, _terminate)
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs per worker
        check_environment()
        check_versions()
        return int(args._module.run(args) or 0)
    except GraphcError as e:
        if e.where is None and args is not None:    # a flag's error: the command stands for <file>
            e.where = f"graphc {args.command}"
        return _fail(e)
    except BrokenPipeError:
        return 0
    except OSError as e:  # a full disk, a read-only file system ... met while writing or reading
        return _fail(os_error_line(e))
    except MemoryError:
        return _fail(GraphcError(None, "out of memory (try a smaller model, batch or sequence length)"))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        _install(signal.SIGTERM, previous)


def _fail(e: GraphcError) -> int:
    print(f"error: {e.one_line()}", file=sys.stderr)
    return 2


def _install(signum, handler):
    """Set a signal handler where Python allows it (the main thread); returns the previous one."""
    try:
        return signal.signal(signum, handler)
    except (ValueError, TypeError):  # not the main thread, or no previous Python handler to restore
        return None


if __name__ == "__main__":
    sys.exit(main())
