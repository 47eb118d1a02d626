"""`python -m spade_ad` runs the command line."""

from .cli import run

run()
