"""Test helper: run the command line in-process and return its exit code."""

from __future__ import annotations

from spade_ad.apps.cli import main


def run_cli(args: list[object]) -> int:
    """Exit code of `spade-ad ARGS` run in-process (0 when `main` returns normally)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
