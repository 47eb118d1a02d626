"""Command-line interface: a thin layer over the library (`spade_ad.estimators.spade`, `spade_ad.outputs.writers`,
`spade_ad.apps.evaluation`, `spade_ad.apps.service`). It holds no policy: settings, validation, image checks, scores and
outputs all come from the library.

The model options of `fit` and `evaluate` are generated from the settings table (`spade_ad.settings`), so a new
setting appears here, with its help and its checks, by being declared there. Heavy modules (torch, timm, FastAPI)
are imported inside the commands only: `spade-ad --help` loads none of them.

Modules, each using only those below it: `entry` (the `spade-ad` group and `main`, errors as one line and an exit
code), `models` (fit, add, calibrate, predict, evaluate, demo), `line` (watch, drift, record), `deploy` (export,
serve), `options` (the options and helpers the commands share).
"""

from .entry import app, main, run

__all__ = ["app", "main", "run"]
