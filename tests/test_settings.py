"""The settings table is the single source of truth: the estimator, the CLI, model files and the docs follow it;
and the estimator keeps scikit-learn's contract."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import ParameterGrid

import spade_ad
from spade_ad import ModelFileError, SettingError, Spade
from spade_ad import settings as table
from spade_ad.apps.cli import app
from spade_ad.data.modelfile import read_model_file, write_safetensors

SETTINGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_estimator_signature_is_the_table() -> None:
    parameters = inspect.signature(Spade.__init__).parameters
    names = [name for name in parameters if name != "self"]
    assert names == list(table.NAMES)
    assert {name: parameters[name].default for name in names} == table.DEFAULTS


@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_cli_model_options_are_the_table(command: str) -> None:
    options = {p.name for p in app.commands[command].params}
    cli_settings = {s.name for s in table.SETTINGS if s.cli}
    assert cli_settings <= options
    assert not ({s.name for s in table.SETTINGS if not s.cli} & options)


def test_docs_settings_table_is_generated_from_the_table() -> None:
    text = SETTINGS_PAGE.read_text(encoding="utf-8")
    start, end = text.index("<!-- settings-table -->"), text.index("<!-- /settings-table -->")
    assert text[start + len("<!-- settings-table -->"):end].strip() == table.markdown_table()


@pytest.mark.parametrize(("name", "value"), [
    ("k_gallery", 0), ("layers", (7,)), ("layers", ()), ("layers", (2, 2)), ("sigma", math.nan), ("sigma", -1),
    ("image_size", 0), ("fusion", "max"), ("patch_size", 2), ("search_radius", -1), ("device", "tpu"),
    ("calibration_fraction", 1.0), ("kappa", 1.5), ("backbone", ""), ("batch_size", True),
])
def test_bad_values_are_refused_naming_the_setting(name: str, value: object) -> None:
    with pytest.raises(SettingError, match=f"setting {name} ") as info:
        table.validate({name: value})
    assert info.value.name == name and isinstance(info.value, ValueError)
    with pytest.raises(SettingError, match=name):
        Spade().set_params(**{name: value})


def test_validate_gives_canonical_values() -> None:
    values = table.validate({"layers": [1, 2], "k_gallery": np.int64(5), "sigma": 2, "search_radius": None})
    assert values["layers"] == (1, 2) and type(values["k_gallery"]) is int and values["sigma"] == 2.0
    assert set(values) == set(table.NAMES)
    with pytest.raises(SettingError, match="not a setting"):
        table.validate({"k": 3})


def test_sklearn_contract_clone_params_repr() -> None:
    model = Spade(k_gallery=7, layers=(1, 2))
    twin = clone(model)
    assert twin is not model and twin.get_params() == model.get_params()
    assert model.get_params(deep=True) == model.get_params(deep=False)
    assert repr(model) == "Spade(k_gallery=7, layers=(1, 2))"
    assert repr(Spade()) == "Spade()"
    with pytest.raises(ValueError, match="k_gallery"):
        model.set_params(k_gallery=-1)
    assert model.set_params(k_gallery=3) is model and model.k_gallery == 3


def test_parameter_grid_on_a_tiny_set(synthetic_root: Path) -> None:
    """A scikit-learn grid sweep fits and scores each combination; every fitted attribute ends in `_`."""
    base = Spade(device="cpu", progress=False, k_gallery=3)
    before = set(vars(base))
    test = sorted((synthetic_root / "test").rglob("*.png"))
    labels = np.array([p.parent.name != "good" for p in test])
    for params in ParameterGrid({"image_score": ["map_max", "knn"], "kappa": [1, 2]}):
        model = clone(base).set_params(**params).fit(synthetic_root / "train" / "good")
        added = set(vars(model)) - before
        assert added and all(name.endswith("_") or name.startswith("_") for name in added)
        scores = model.score(test)
        assert scores.shape == (len(test),) and np.isfinite(scores).all()
        assert scores[labels].mean() > scores[~labels].mean()


def _rewrite_header(source: Path, target: Path, edit) -> None:
    header, arrays = read_model_file(source)
    edit(header)
    write_safetensors(target, {k: np.asarray(v) for k, v in arrays.items()}, json.dumps(header))


@pytest.mark.parametrize(("name", "value"), [("sigma", math.nan), ("layers", [7]), ("k_gallery", 0),
                                             ("fusion", "max"), ("no_such_setting", 1)])
def test_edited_header_with_recomputed_checksum_is_refused(fitted_model: Spade, tmp_path: Path, name: str,
                                                          value: object) -> None:
    saved = fitted_model.save(tmp_path / "model.safetensors")
    edited = tmp_path / "edited.safetensors"
    _rewrite_header(saved, edited, lambda header: header["settings"].__setitem__(name, value))
    with pytest.raises(ModelFileError, match=f"invalid setting: setting {name} "):
        spade_ad.load(edited)


def test_training_parts_that_do_not_match_the_training_images_are_refused(fitted_model: Spade,
                                                                          tmp_path: Path) -> None:
    """The density normalisation's rows (one per training image) are checked at load: too few, or not numbers."""
    saved = fitted_model.save(tmp_path / "model.safetensors")
    for name, edit in (("short", lambda parts: parts.pop()), ("text", lambda parts: parts[0].__setitem__(0, "x"))):
        edited = tmp_path / f"{name}.safetensors"
        _rewrite_header(saved, edited, lambda header, edit=edit: edit(header["calibration"]["train_parts"]))
        with pytest.raises(ModelFileError, match="train_parts"):
            spade_ad.load(edited)
    edited = tmp_path / "parts.safetensors"  # the calibration scores' parts: a row per score, or none
    _rewrite_header(saved, edited, lambda header: header["calibration"]["parts"].pop())
    with pytest.raises(ModelFileError, match="calibration.parts has"):
        spade_ad.load(edited)


def test_header_that_does_not_match_its_tensors_is_refused(fitted_model: Spade, tmp_path: Path) -> None:
    saved = fitted_model.save(tmp_path / "model.safetensors")
    edited = tmp_path / "edited.safetensors"
    _rewrite_header(saved, edited, lambda header: header["train_names"].append("extra.png"))
    with pytest.raises(ModelFileError, match="does not match its tensors"):
        spade_ad.load(edited)
    _rewrite_header(saved, edited, lambda header: header["settings"].__setitem__("layers", [1, 2, 3]))
    with pytest.raises(ModelFileError, match="does not match its tensors"):
        spade_ad.load(edited)


def test_help_imports_neither_torch_nor_fastapi() -> None:
    code = (
        "import sys\nfrom spade_ad.apps.cli import main\n"
        "for argv in ([\"--help\"], [\"fit\", \"--help\"], [\"predict\", \"--help\"], [\"evaluate\", \"--help\"],"
        " [\"serve\", \"--help\"]):\n"
        "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert not exc.code, exc.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'fastapi', 'sklearn', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_bad_cli_option_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")  # never read: the option is refused first
    for option, value in [("--k-gallery", "0"), ("--layers", "7"), ("--sigma", "nan"), ("--image-size", "0"),
                          ("--fusion", "max"), ("--backbone", "no_such_net"), ("--false-alarm-rate", "2")]:
        result = subprocess.run(
            [sys.executable, "-m", "spade_ad", "fit", str(tmp_path), "-o", str(tmp_path / "m.safetensors"),
             option, value], capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and option in lines[0] and "Traceback" not in result.stderr


def test_every_preset_is_valid_settings_with_an_evaluation_size() -> None:
    from spade_ad.settings import PRESET_EVAL_SIZE, PRESETS, validate

    assert set(PRESETS) == set(PRESET_EVAL_SIZE)
    for name, preset in PRESETS.items():
        assert validate(preset, partial=True) == {k: validate({k: v}, partial=True)[k] for k, v in preset.items()}, name
    assert PRESETS["objects"] == {"patch_size": 3}
