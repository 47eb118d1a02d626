"""Benchmark evaluation of the estimator on MVTec-AD-layout data.

`runner` fits and scores each category (`evaluate`, `evaluate_category`), `report` formats and writes the table and
the metrics files, `metrics` holds the anomaly-detection metrics and `plots` the evaluation figures. Nothing in the
core package imports this one.

Names are imported on first use (PEP 562), so `spade_ad.apps.evaluation.metrics` can be imported without the runner.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "evaluate": "runner", "evaluate_category": "runner", "CategoryResult": "runner", "PAPER_PIXEL_RESULTS": "runner",
    "format_table": "report",
}

__all__ = ["PAPER_PIXEL_RESULTS", "CategoryResult", "evaluate", "evaluate_category", "format_table"]

if TYPE_CHECKING:
    from .report import format_table
    from .runner import PAPER_PIXEL_RESULTS, CategoryResult, evaluate, evaluate_category


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
