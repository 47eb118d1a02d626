"""Distributed predict and fit on Ray Data (`spade_ad.apps.distributed`): the same answers as one process, each input
once when a worker dies, clear errors, and nothing of Ray needed by `import spade_ad` and the other commands.

The Ray runs share one small local cluster (3 logical CPUs: two actors and one CPU for reading and decoding),
started once for the module and shut down after it; they are marked slow (each run starts its actors: ~15 s here).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from spade_ad import Spade
from spade_ad.apps import distributed
from spade_ad.apps.distributed import ClusterError
from spade_ad.apps.distributed.driver import _in_input_order
from spade_ad.apps.distributed.listing import _list_inputs, _Listing
from spade_ad.apps.distributed.session import _check_address
from spade_ad.data.images import read_image
from spade_ad.data.inputs import ImageItem, collect_images
from spade_ad.errors import ImageReadError, SettingError

BROKEN = "zz_broken.png"  # sorts last: every good input comes before it


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One local Ray cluster for the module's runs (the runs reuse an open session), shut down at the end."""
    pytest.importorskip("ray")
    with distributed.ray_session(None, workers=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def model_file(fitted_model: Spade, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted_model.save(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def inputs_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic test images (good and two defect kinds, in subfolders) and one truncated PNG."""
    folder = tmp_path_factory.mktemp("inputs") / "test"
    shutil.copytree(synthetic_root / "test", folder)
    whole = (folder / "good" / "000.png").read_bytes()
    (folder / BROKEN).write_bytes(whole[: len(whole) // 2])
    return folder


@pytest.fixture(scope="module")
def plain_out(model_file: Path, inputs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain (single-process) `spade-ad predict --save-maps --skip-bad` of the inputs: the reference. With the
    actors' torch thread count (one): CPU convolutions sum in a thread-count-dependent order, and with the same
    count the floats, hence every file, are the same."""
    import torch

    from cli_run import run_cli

    out = tmp_path_factory.mktemp("plain") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(["predict", model_file, inputs_dir, "-o", out, "--save-maps", "--skip-bad"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_same_rows(rows: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    """Same paths in the same order; scores within float32 noise (the CSV keeps 6 significant digits); the same
    verdicts and regions."""
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for column in ("score", "normalized_score", "p_value"):
            assert float(row[column]) == pytest.approx(float(want[column]), rel=2e-5, abs=1e-6), (row, want)
        for column in ("is_anomalous", "regions", "largest_region_area"):
            assert row[column] == want[column], (row, want)


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def _assert_same_files(out: Path, plain: Path) -> None:
    """Every file of the plain run, byte for byte (scores.csv, regions.jsonl, skipped.csv, every picture and map),
    plus scores.parquet, and nothing else (no temporary file left)."""
    assert _files(out) == _files(plain) | {"scores.parquet"}
    for name in sorted(_files(plain)):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name


# ---------------------------------------------------------------- same answers


@pytest.mark.slow
def test_predict_on_ray_gives_the_files_and_scores_of_plain_predict(cluster: Any, model_file: Path,
                                                                    inputs_dir: Path, plain_out: Path,
                                                                    tmp_path: Path) -> None:
    skipped: list[str] = []
    run = distributed.predict(model_file, inputs_dir, tmp_path / "ray", save_maps=True, skip_bad=True,
                              on_skip=lambda item, error: skipped.append(item.name))
    out = tmp_path / "ray"
    plain = _rows(plain_out)
    assert run.count == len(plain) == 12 and skipped == [BROKEN]
    _assert_same_rows(_rows(out), plain)
    _assert_same_files(out, plain_out)  # the actors wrote the pictures and maps, the driver the rows
    for tiff in sorted(p for p in _files(plain_out) if p.endswith(".tiff")):
        np.testing.assert_array_equal(tifffile.imread(out / tiff), tifffile.imread(plain_out / tiff), err_msg=tiff)
    # The regions file: the same boxes and areas per image, in the same order.
    plain_regions = (plain_out / "regions.jsonl").read_text().splitlines()
    ray_regions = (out / "regions.jsonl").read_text().splitlines()
    assert len(ray_regions) == len(plain_regions)
    import json

    for mine, theirs in zip(ray_regions, plain_regions):
        a, b = json.loads(mine), json.loads(theirs)
        assert a["path"] == b["path"]
        assert [(r["box"], r["area"]) for r in a["regions"]] == [(r["box"], r["area"]) for r in b["regions"]]
    # scores.parquet: the same rows, typed.
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pylist()
    assert [r["path"] for r in table] == [r["path"] for r in plain]
    for row, want in zip(table, plain):
        assert row["score"] == pytest.approx(float(want["score"]), rel=2e-5)
        assert row["is_anomalous"] == bool(int(want["is_anomalous"]))
        assert row["regions"] == int(want["regions"])


@pytest.mark.slow
def test_unreadable_image_stops_the_run_with_the_plain_error_after_every_row_before_it(
        cluster: Any, model_file: Path, inputs_dir: Path, plain_out: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as raised:
        read_image(inputs_dir / BROKEN)  # what a plain run says
    with pytest.raises(ImageReadError) as on_ray:
        distributed.predict(model_file, inputs_dir, tmp_path / "ray")
    assert str(on_ray.value) == str(raised.value) and on_ray.value.kind == raised.value.kind
    _assert_same_rows(_rows(tmp_path / "ray"), _rows(plain_out))  # every row before the bad file was written
    assert not (tmp_path / "ray" / "scores.parquet").exists()  # the Parquet file is a complete run's only


@pytest.mark.slow
def test_killed_actor_loses_and_doubles_no_row(cluster: Any, model_file: Path, inputs_dir: Path, plain_out: Path,
                                               tmp_path: Path) -> None:
    """An actor exits (os._exit) after scoring its first batch of 8 images, before returning it; Ray starts it
    again and retries the batch. The inputs are given as a file:// URI (read through pyarrow.fs)."""
    marker = tmp_path / "crashed"
    run = distributed.predict(model_file, inputs_dir.as_uri(), tmp_path / "ray", skip_bad=True,
                              _crash_once=(str(marker), 5))
    assert marker.exists(), "no actor was killed: the test did not test anything"
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)  # that actor's process is gone
    rows = _rows(tmp_path / "ray")
    assert Counter(r["path"] for r in rows) == Counter(r["path"] for r in _rows(plain_out))  # each exactly once
    assert run.count == len(rows) == 12
    _assert_same_rows(rows, _rows(plain_out))
    assert (tmp_path / "ray" / "skipped.csv").read_text().splitlines()[1].startswith(f"{BROKEN},")


@pytest.mark.slow
def test_actor_killed_while_writing_a_picture_leaves_every_file_whole(cluster: Any, model_file: Path,
                                                                      inputs_dir: Path, plain_out: Path,
                                                                      tmp_path: Path) -> None:
    """An actor exits half-way through a file (half of it in its temporary name, not renamed) after 5 images;
    its batch is retried, which writes that batch's files again whole: every file is the plain run's, byte for
    byte, each row is there once, and no temporary file is left."""
    marker = tmp_path / "crashed"
    run = distributed.predict(model_file, inputs_dir, tmp_path / "ray", save_maps=True, skip_bad=True,
                              _crash_once=(str(marker), 5, "write"))
    assert marker.exists(), "no actor was killed: the test did not test anything"
    assert run.count == 12
    _assert_same_files(tmp_path / "ray", plain_out)


@pytest.mark.slow
def test_inputs_sharing_a_name_get_the_plain_run_s_numbered_files(cluster: Any, model_file: Path,
                                                                  inputs_dir: Path, tmp_path: Path) -> None:
    """Two inputs with one output name: the numbered names depend on the order of writing, so the driver writes
    the pictures (as a plain run); the same files as a plain predict of the same list."""
    import torch

    from spade_ad import load
    from spade_ad.outputs.writers import PredictionWriter

    image = inputs_dir / "good" / "000.png"
    given = [image, inputs_dir / "good" / "001.png", image]
    run = distributed.predict(model_file, [str(p) for p in given], tmp_path / "ray")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load(model_file)
        with PredictionWriter.for_model(model, tmp_path / "plain") as writer:
            writer.write_all(model.iter_predict(given, original_size=True, keep_images=True))
    finally:
        torch.set_num_threads(threads)
    assert run.count == 3 and "overlays/000~2.png" in _files(tmp_path / "ray")
    _assert_same_files(tmp_path / "ray", tmp_path / "plain")


@pytest.mark.slow
def test_fit_on_ray_writes_the_model_file_of_a_single_process_fit(cluster: Any, synthetic_root: Path,
                                                                  tmp_path: Path) -> None:
    """Byte-identical when the single process computes with the actors' thread count (one), as here."""
    import torch

    train = synthetic_root / "train" / "good"
    settings = {"k_gallery": 5, "device": "cpu", "progress": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Spade(**settings).fit(train).save(tmp_path / "single.safetensors")
        model = distributed.fit(train, tmp_path / "ray.safetensors", **settings)
    finally:
        torch.set_num_threads(threads)
    assert model.train_names_ == [item.name for item in collect_images(train)]
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (single, tmp_path / "ray.safetensors")]
    assert digest[0] == digest[1]
    spots = synthetic_root / "test" / "spot"  # labelled defects choosing the weights: the same choice and scores
    torch.set_num_threads(1)
    try:
        single = Spade(**settings).fit(train, defect=spots)
        model = distributed.fit(train, defect=spots, **settings)
    finally:
        torch.set_num_threads(threads)
    assert model.calibration_.check["weights"] == single.calibration_.check["weights"]
    assert model.calibration_.scores == single.calibration_.scores
    assert model.calibration_.note == single.calibration_.note


# ---------------------------------------------------------------- exactly once, in order (no cluster needed)


class _FakeDataset:
    """What `_in_input_order` reads of a Ray dataset: `iter_batches` of numpy columns."""

    def __init__(self, batches: list[list[tuple[str, str]]]) -> None:
        self.batches = batches

    def iter_batches(self, **_: Any) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.batches:
            yield {"path": np.array([key for key, _ in batch]), "result": np.array([v for _, v in batch])}


def _listing(keys: list[str]) -> _Listing:
    items = [ImageItem(f"name{i}", path=Path(key)) for i, key in enumerate(keys)]
    return _Listing(items, keys, None, True, keys)


def test_results_come_in_input_order_once_each_and_repeats_are_dropped() -> None:
    listing = _listing(["a", "b", "a", "c"])  # "a" listed twice: one result, written for both
    ds = _FakeDataset([[("b", "b1"), ("a", "a1")], [("b", "b-retried"), ("c", "c1")], [("a", "a-retried")]])
    got = [(index, str(row["result"])) for index, row in _in_input_order(ds, listing)]
    assert got == [(0, "a1"), (1, "b1"), (2, "a1"), (3, "c1")]


def test_an_input_without_a_result_is_an_error_not_a_gap() -> None:
    listing = _listing(["a", "b", "c"])
    rows = []
    with pytest.raises(ClusterError, match="1 of 3 inputs got no result.*first: b"):
        rows.extend(index for index, _ in _in_input_order(_FakeDataset([[("a", "1"), ("c", "3")]]), listing))
    assert rows == [0]  # what came before the gap was handed on; nothing after it


# ---------------------------------------------------------------- inputs and errors


def test_inputs_in_a_filesystem_are_named_and_ordered_as_plain_runs_name_local_ones(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from pyarrow import fs

    for folder in ("a/deep", "a/.hidden", "b"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("a/x.png", "a/deep/y.JPG", "a/.hidden/z.png", "a/.dot.png", "a/notes.txt", "b/x.png"):
        (tmp_path / name).write_bytes(b"not decoded here")
    inside = fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem())
    for given, local in ((["a"], tmp_path / "a"), (["a", "b"], [tmp_path / "a", tmp_path / "b"])):
        expected = [item.name for item in collect_images(local)]
        for filesystem in (inside, DirFileSystem(str(tmp_path), fsspec.filesystem("file"))):
            listing = _list_inputs(given if len(given) > 1 else given[0], filesystem)
            assert [item.name for item in listing.items] == expected
    listing = _list_inputs((tmp_path / "a").as_uri())
    assert [item.name for item in listing.items] == ["deep/y.JPG", "x.png"]
    assert listing.shown[1] == f"{(tmp_path / 'a').as_uri()}/x.png" and listing.keys[1] == str(tmp_path / "a/x.png")
    with pytest.raises(ImageReadError, match="file not found"):
        _list_inputs((tmp_path / "missing").as_uri())
    with pytest.raises(TypeError, match="image files"):
        _list_inputs(np.zeros((2, 8, 8, 3), dtype=np.uint8))


def test_bad_or_silent_cluster_addresses_are_refused_at_once() -> None:
    with pytest.raises(ClusterError, match="bad Ray address 'model.safetensors'"):
        _check_address("model.safetensors")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        _check_address(f"127.0.0.1:{port}")


def test_bad_run_options_are_refused_before_any_work(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        distributed.predict(model_file, tmp_path, tmp_path / "out", workers=0)
    with pytest.raises(SettingError, match="images is off"):
        distributed.predict(model_file, tmp_path, tmp_path / "out", images=False, save_maps=True)


def test_import_and_commands_work_without_ray(model_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """With `import ray` failing (as when it is not installed): import, --help, fit and predict work; --ray says
    what to install, in one line, exit code 2."""
    train = tmp_path / "train"
    train.mkdir()
    for image in sorted((synthetic_root / "train" / "good").glob("*.png"))[:4]:
        shutil.copy(image, train)
    code = (
        "import sys\nsys.modules['ray'] = None  # `import ray` raises ImportError, as without Ray installed\n"
        "import spade_ad\nfrom spade_ad.apps.cli import main\n"
        "def run(*argv):\n    try:\n        main([str(a) for a in argv])\n    except SystemExit as exc:\n"
        "        return exc.code or 0\n    return 0\n"
        "assert run('--help') == 0\n"
        f"assert run('fit', {str(train)!r}, '-o', {str(tmp_path / 'm.safetensors')!r}, '--k-gallery', '2',"
        " '--device', 'cpu') == 0\n"
        f"assert run('predict', {str(model_file)!r}, {str(train)!r}, '-o', {str(tmp_path / 'out')!r}) == 0\n"
        f"print('RAY', run('predict', {str(model_file)!r}, {str(train)!r}, '-o', {str(tmp_path / 'out2')!r},"
        " '--ray'))\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('ray.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RAY 2" in result.stdout and "LOADED []" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: distributed runs need Ray, which is not installed: pip install 'spade-ad[ray]'"]
    assert len(_rows(tmp_path / "out")) == 4


def test_actors_write_the_pictures_unless_two_inputs_share_a_name(inputs_dir: Path, tmp_path: Path) -> None:
    """The actors get each path's stems (a plain run's names); with numbered names the driver writes instead."""
    from spade_ad.apps.distributed.driver import _worker_files
    from spade_ad.outputs.writers import output_stems

    listing = _list_inputs(inputs_dir)
    files = _worker_files(listing, tmp_path, True, output_stems)
    assert files is not None and files["out_dir"] == str(tmp_path.resolve()) and files["save_maps"]
    assert files["stems"][listing.keys[0]] == [listing.items[0].name.rsplit(".", 1)[0]]
    assert sorted(stem for stems in files["stems"].values() for stem in stems) == sorted(
        output_stems([item.name for item in listing.items]))
    image = str(inputs_dir / "good" / "000.png")
    assert _worker_files(_list_inputs([image, image]), tmp_path, False, output_stems) is None
