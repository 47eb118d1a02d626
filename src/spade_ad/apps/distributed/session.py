"""The Ray session of a distributed run: importing Ray, checking a cluster's address, starting (or joining) the
cluster for one run with Ray's logs and progress bars kept off the console."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from ...errors import SpadeError

#: Seconds to wait for a cluster's address to answer before saying it does not (Ray itself waits minutes).
CONNECT_TIMEOUT_S = 5.0


class ClusterError(SpadeError):
    """A distributed run cannot start or finish: Ray is not installed, the cluster's address is wrong or does not
    answer, or the cluster lost work it could not redo."""



def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the `ray[data]` part)
    except ImportError as exc:
        raise ClusterError("distributed runs need Ray, which is not installed: pip install 'spade-ad[ray]'") from exc
    return ray


def _check_address(address: str) -> None:
    """Refuse an address that is not host:port, ray://host:port or auto, and one where nothing answers (Ray would
    retry for minutes, then exit the process)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"bad Ray address {address!r}: expected host:port, ray://host:port or auto (on the "
                           f"command line write --ray=ADDRESS, or put --ray last to run on this machine)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                           f"`ray start --head` there, or leave out the address to run on this machine") from exc


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray's C++ log lines off the console while the session starts: RAY_BACKEND_LOG_LEVEL=fatal (unless the user
    set it) for this process and the ones Ray starts (without it, every actor start logs a note on restarts), and
    the process's stderr sent to /dev/null meanwhile (Ray announces the level it read there). Ray's own log files
    in its session folder are unaffected; a failure to start is raised with its message."""
    before = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if before is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, workers: int = 2) -> Iterator[Any]:
    """The `ray` module, connected for one run: to the cluster at `address`, or (None or "local") to one started in
    this process with `workers + 1` CPUs and shut down at the end. A session the caller already opened
    (`ray.is_initialized()`) is used as it is and left open (then give no address). Ray's own logs and progress
    bars are kept off the console for the run (its logs stay in its session folder). Raises ClusterError when Ray
    is missing or the cluster cannot be reached."""
    ray = _import_ray()
    local = address in (None, "local")
    if ray.is_initialized():
        if not local:
            raise ClusterError(f"this process is already connected to a Ray cluster, so it cannot connect to "
                               f"{address}: leave out the address to run on that session, or end it first")
        with _quiet_data(ray):
            yield ray
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if not local:
        _check_address(address)
    with _quiet_ray_logs():
        try:
            if local:
                ray.init(num_cpus=workers + 1, include_dashboard=False, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, SystemExit) as exc:
            where = "start Ray on this machine" if local else f"connect to the Ray cluster at {address}"
            cause = exc.__cause__  # e.g. the cluster asks for an authentication token
            why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:300]})" if cause and str(cause) else ""
            raise ClusterError(f"cannot {where}: {exc or type(exc).__name__}{why}") from exc
    try:
        with _quiet_data(ray):
            yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_data(ray: Any) -> Iterator[None]:
    """Ray Data's progress bars and logging off, and results in input order, for this run only."""
    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = (context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats,
             options.verbose_progress, options.preserve_order)
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    context.enable_progress_bars = context.print_on_execution_start = context.enable_auto_log_stats = False
    options.verbose_progress = False
    options.preserve_order = True  # results arrive in input order: the driver's reorder buffer stays small
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)  # a failure is raised to the caller, in one message
    try:
        yield
    finally:
        (context.enable_progress_bars, context.print_on_execution_start, context.enable_auto_log_stats,
         options.verbose_progress, options.preserve_order) = saved
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
