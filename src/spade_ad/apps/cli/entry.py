"""The `spade-ad` command: the group of every command and `main`, the entry point that turns errors into one line
on stderr and an exit code (2 for usage errors and bad input, 1 for I/O faults), never a traceback."""

from __future__ import annotations

import gc
import sys

import click

from ... import settings as settings_table
from ...errors import SettingError, SpadeError
from .deploy import export, serve
from .line import drift, record_group, watch
from .models import add, calibrate, demo, evaluate, fit, predict


@click.group(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def app() -> None:
    """SPADE anomaly detection: fit on good images, then score and localise defects in new ones."""


for _command in (fit, add, calibrate, predict, evaluate, demo, watch, drift, record_group, export, serve):
    app.add_command(_command)


def _setting_message(exc: SettingError) -> str:
    """A SettingError in the CLI's words: the option's name rather than the library's setting name."""
    setting = settings_table.BY_NAME.get(exc.name)
    if setting is None:
        return str(exc)
    shown = "" if exc.value is None else f" (got {exc.value!r})"
    return f"{setting.option} {exc.problem}{shown}; allowed: {exc.allowed}"


#: The optional extra that brings each heavy dependency (pyproject.toml), for the message when it is missing.
_EXTRAS = {"torch": "fit", "torchvision": "fit", "timm": "fit", "sklearn": "fit", "onnxruntime": "runtime",
           "onnx": "export", "onnxscript": "export", "openvino": "openvino", "fastapi": "serve", "uvicorn": "serve",
           "ray": "ray"}


def run() -> None:
    """The process entry (`spade-ad`, `python -m spade_ad`): `main`, then the process ends without its last garbage
    collection, which would walk every object torch and timm made: 1.2 s of a 5 s run (docs/outputs.md). A program
    that calls the command and goes on calls `main`."""
    try:
        main()
    finally:
        gc.freeze()  # the objects alive now are never collected again: the process is ending


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors and bad input become one line on stderr and exit code 2, I/O faults one line and
    exit code 1; never a traceback."""
    try:
        app.main(args=argv, prog_name="spade-ad", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(2)
    except SettingError as exc:
        click.echo(f"error: {_setting_message(exc)}", err=True)
        sys.exit(2)
    except SpadeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # a light install (runtime extra only) asked for the torch path
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        click.echo(f"error: this needs {exc.name}, which is not installed: pip install 'spade-ad[{extra}]' "
                   f"(or score an exported bundle: `spade-ad predict BUNDLE`)", err=True)
        sys.exit(2)
    except OSError as exc:
        target = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot access{target}: {exc.strerror or exc}", err=True)
        sys.exit(1)
