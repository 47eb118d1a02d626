"""Shared fixtures: a small generated dataset and a model fitted on it (built once per test session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spade_ad import Spade
from spade_ad.data.synthetic import make_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic product dataset in the MVTec layout (non-square, to exercise the geometry)."""
    root = tmp_path_factory.mktemp("synthetic") / "widget"
    return make_synthetic_dataset(root, n_train=12, n_test_good=4, n_test_defect=4, size=(160, 224), seed=3)


@pytest.fixture(scope="session")
def fitted_model(synthetic_root: Path) -> Spade:
    """A default-settings model (but a small gallery) fitted on the synthetic training images."""
    return Spade(k_gallery=5, device="cpu", progress=False).fit(synthetic_root / "train" / "good")


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The real MVTec AD bottle category from ../shared; its absence fails in CI and skips elsewhere."""
    root = SHARED_DATA / "bottle"
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real data missing in CI: {root}")
        pytest.skip(f"real MVTec AD bottle data not found at {root}")
    return root


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throw-away PostgreSQL cluster for the session (tests/pg_cluster.py); skipped with the reason when none can
    be started (PostgreSQL or psycopg not installed)."""
    import pg_cluster

    cluster = pg_cluster.start_cluster()
    if isinstance(cluster, str):
        pytest.skip(cluster)
    yield cluster
    pg_cluster.remove(cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def record_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a record test writes: a new SQLite file, or a new database in the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "inspections.db")
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.database(f"t_{abs(hash(request.node.nodeid)) % 10**12}")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs to fill up (a full disk under a record or an outbox); root only, skipped elsewhere with the
    reason; unmounted after the test."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
