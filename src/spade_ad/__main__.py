"""`python -m spade_ad` runs the command line."""

from .apps.cli import run

run()
