"""Model files against random damage: `spade_ad.load` either refuses a file with a ModelFileError or loads a model
that works (it scores an image); it never raises anything else, whatever the bytes.

Groups: bytes flipped anywhere; files cut at any length; the header of one model spliced onto the data of another
(and random cuts of two files joined); the safetensors header edited by hand (dtypes, shapes, offsets, lengths,
metadata: missing keys, wrong types, odd values) without fixing the checksum; the model's JSON header edited at any
place (deleted keys, values of other types) and the tensors changed (dropped, added, retyped, reshaped, rewritten
values), both with the checksum recomputed, as someone who knows the format would do.

Deterministic by default (a fixed set of examples, a few seconds); `SPADE_FUZZ_EXAMPLES=2000` explores more, with
random examples each run.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spade_ad
from spade_ad import ModelFileError, Spade
from spade_ad.data.modelfile import read_model_file, write_safetensors
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.estimators import spade as model_module

_EXAMPLES = int(os.environ.get("SPADE_FUZZ_EXAMPLES", "0"))
fuzz = settings(
    max_examples=_EXAMPLES or 40, deadline=None, database=None, derandomize=not _EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
fuzz_loading = settings(fuzz, max_examples=_EXAMPLES or 25)  # edits that often load: each scores an image
OUTCOMES: Counter[tuple[str, str]] = Counter()
_files = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _one_backbone() -> Iterator[None]:
    """Every load reuses one built backbone (building it takes seconds; the file checks are what is tested here)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(model_module, "build_backbone", functools.cache(model_module.build_backbone))
        yield
    print("\nmodel-file fuzz outcomes (group, outcome): count")  # shown with -s, for the README's numbers
    for key, count in sorted(OUTCOMES.items()):
        print(f"  {key}: {count}")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tiny models (6 and 4 training images) fitted once, their files' bytes, and an image to score."""
    base = tmp_path_factory.mktemp("fuzz")
    root = make_synthetic_dataset(base / "data", n_train=6, n_test_good=1, n_test_defect=1, size=(64, 64), seed=0)
    train = sorted((root / "train" / "good").iterdir())
    params = {"k_gallery": 2, "device": "cpu", "progress": False, "image_size": 64}
    a = Spade(**params).fit(train).save(base / "a.safetensors")
    b = Spade(**params, seed=1).fit(train[:4]).save(base / "b.safetensors")
    return {"dir": base, "a": a.read_bytes(), "b": b.read_bytes(), "a_path": a, "image": root / "test" / "good"}


def outcome(work: dict[str, Any], group: str, data: bytes | None = None, path: Path | None = None) -> str:
    """Load `data` (or the file at `path`): "refused" (ModelFileError), or "loaded" after scoring an image with it.
    Anything else raised fails the test."""
    if path is None:
        path = work["dir"] / f"fuzzed_{next(_files)}.safetensors"  # a new file each time: loaded models map theirs
        path.write_bytes(data or b"")
    try:
        model = spade_ad.load(path)
    except ModelFileError:
        OUTCOMES[group, "refused"] += 1
        return "refused"
    assert len(model.score(work["image"])) == 1
    OUTCOMES[group, "loaded"] += 1
    return "loaded"


def _header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


# ---------------------------------------------------------------- bytes


@fuzz
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_flipped_bytes(work: dict[str, Any], flips: list[tuple[float, int]]) -> None:
    data = bytearray(work["a"])
    positions = [int(where * len(data)) for where, _ in flips]
    for position, (_, mask) in zip(positions, flips):
        data[position] ^= mask
    result = outcome(work, "flipped bytes", bytes(data))
    changed = [p for p in positions if data[p] != work["a"][p]]
    if changed and max(changed) >= _header_length(work["a"]):
        assert result == "refused"  # the data is covered by the checksum (a header byte may be JSON whitespace)


@fuzz
@given(length=st.integers(0, 10**9))
def test_truncated_files(work: dict[str, Any], length: int) -> None:
    assert outcome(work, "truncated", work["a"][: length % len(work["a"])]) == "refused"


@fuzz
@given(cut_a=st.integers(0, 10**9), cut_b=st.integers(0, 10**9))
def test_spliced_files(work: dict[str, Any], cut_a: int, cut_b: int) -> None:
    a, b = work["a"], work["b"]
    assert outcome(work, "spliced", a[:_header_length(a)] + b[_header_length(b):]) == "refused"
    assert outcome(work, "spliced", b[:_header_length(b)] + a[_header_length(a):]) == "refused"
    joined = a[: cut_a % len(a)] + b[cut_b % len(b):]
    if joined not in (a, b):
        assert outcome(work, "spliced", joined) == "refused"


# ---------------------------------------------------------------- the safetensors header, checksum not fixed

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
    | st.sampled_from(["F16", "F32", "F64", "I32", "I64", "BF16", "U8", "spade-ad-model", "2", "²", "1" * 30,
                       "\ud800", "0" * 64]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _raw_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = _header_length(data)
    return json.loads(data[8:length]), data[length:]


def _with_raw_header(entries: dict[str, Any], body: bytes, length_change: int = 0) -> bytes:
    encoded = json.dumps(entries).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", max(0, len(encoded) + length_change)) + encoded + body


@fuzz
@given(st.data())
def test_edited_safetensors_header(work: dict[str, Any], data: st.DataObject) -> None:
    entries, body = _raw_header(work["a"])
    name = data.draw(st.sampled_from(sorted(entries)))
    fields = sorted(entries[name]) if isinstance(entries[name], dict) else []
    field = data.draw(st.sampled_from([None, *fields]))  # None: the whole entry
    action = data.draw(st.sampled_from(["replace", "delete", "nudge"]))
    if field is None:
        if action == "delete":
            del entries[name]
        else:
            entries[name] = data.draw(json_values)
    elif action == "delete":
        del entries[name][field]
    elif action == "nudge" and isinstance(entries[name][field], list) and entries[name][field]:
        index = data.draw(st.integers(0, len(entries[name][field]) - 1))
        entries[name][field][index] += data.draw(st.sampled_from([-4, -1, 1, 4, 2**40]))
    else:
        entries[name][field] = data.draw(json_values)
    length_change = data.draw(st.sampled_from([0, 0, 0, -8, -1, 1, 8, 10**6]))
    edited = _with_raw_header(entries, body, length_change)
    result = outcome(work, "edited safetensors header", edited)
    if result == "loaded":  # only a change that means the same: format_version 2 for "2"
        assert _raw_header(edited)[0] == _raw_header(work["a"])[0] or entries["__metadata__"]["format_version"] == 2


@fuzz
@given(top=json_values)
def test_safetensors_header_of_another_shape(work: dict[str, Any], top: Any) -> None:
    """The whole header replaced by any JSON value (a list, a number, an object of anything)."""
    _, body = _raw_header(work["a"])
    encoded = json.dumps(top).encode()
    assert outcome(work, "edited safetensors header", struct.pack("<Q", len(encoded)) + encoded + body) == "refused"


def _set(path: list[str], value: Any) -> Any:
    def edit(entries: dict[str, Any]) -> None:
        functools.reduce(lambda node, key: node[key], path[:-1], entries)[path[-1]] = value
    return edit


KNOWN = {  # edits that trip careless readers; the list, surrogate, number and "²" ones crashed this one once
    "metadata is null": _set(["__metadata__"], None),
    "metadata is a list": _set(["__metadata__"], ["format"]),
    "header is a lone surrogate": _set(["__metadata__", "header"], "\ud800"),
    "header is a number": _set(["__metadata__", "header"], 7),
    "format_version is superscript two": _set(["__metadata__", "format_version"], "²"),
    "negative shape": _set(["shapes", "shape"], [-6, -2, 2]),
    "float offsets": _set(["shapes", "data_offsets"], [0.0, 192.0]),
    "dtype is a list": _set(["shapes", "dtype"], ["I64"]),
    "entry is a string": _set(["shapes"], "I64"),
    "huge shape of nothing": _set(["shapes", "shape"], [0, 2**70]),
}


@pytest.mark.parametrize("edit", list(KNOWN.values()), ids=list(KNOWN))
def test_known_nasty_safetensors_headers(work: dict[str, Any], edit: Any) -> None:
    entries, body = _raw_header(work["a"])
    edit(entries)
    assert outcome(work, "edited safetensors header", _with_raw_header(entries, body)) == "refused"


# ---------------------------------------------------------------- the model's header and tensors, checksum fixed


def _rewritten(work: dict[str, Any], header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    path = work["dir"] / f"rewritten_{next(_files)}.safetensors"
    write_safetensors(path, arrays, json.dumps(header))
    return path


def _draw_place(data: st.DataObject, value: Any) -> list[Any]:
    """A path of keys / indices into a JSON value, drawn one level at a time."""
    path: list[Any] = []
    while isinstance(value, (dict, list)) and value and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(sorted(value) if isinstance(value, dict) else range(len(value))))
        path.append(key)
        value = value[key]
    return path


@fuzz_loading
@given(st.data())
def test_edited_model_header_with_checksum_fixed(work: dict[str, Any], data: st.DataObject) -> None:
    header, arrays = read_model_file(work["a_path"])
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    top = data.draw(st.sampled_from(sorted(header)))
    place = [top, *_draw_place(data, header[top])]
    parent = functools.reduce(lambda value, key: value[key], place[:-1], header)
    action = data.draw(st.sampled_from(["delete", "replace", "wrap", "stringify"]))
    if action == "delete":
        del parent[place[-1]]
    elif action == "replace":
        parent[place[-1]] = data.draw(json_values)
    elif action == "wrap":
        parent[place[-1]] = [parent[place[-1]]]
    else:
        parent[place[-1]] = json.dumps(parent[place[-1]])
    outcome(work, "edited model header, checksum fixed", path=_rewritten(work, header, arrays))


def _drop(path: list[str]) -> Any:
    def edit(header: dict[str, Any]) -> None:
        del functools.reduce(lambda node, key: node[key], path[:-1], header)[path[-1]]
    return edit


KNOWN_HEADERS = {  # model-header edits (checksum fixed) that once got past the reader and crashed `load`
    "no score scales": _drop(["calibration", "score_scale"]),
    "no calibration source": _drop(["calibration", "source"]),
    "calibration is a list": _set(["calibration"], []),
    "settings are a string": _set(["settings"], "abc"),
    "weights checksum is a number": _set(["backbone", "weights_sha256"], 5),
    "fewer channels than layers": _set(["backbone", "channels"], [40]),
    "score scale of one number": _set(["calibration", "score_scale", "knn"], [1.0]),
}


@pytest.mark.parametrize("edit", list(KNOWN_HEADERS.values()), ids=list(KNOWN_HEADERS))
def test_known_nasty_model_headers(work: dict[str, Any], edit: Any) -> None:
    header, arrays = read_model_file(work["a_path"])
    edit(header)
    path = _rewritten(work, header, {k: np.asarray(v) for k, v in arrays.items()})
    assert outcome(work, "edited model header, checksum fixed", path=path) == "refused"


_DTYPES = [np.dtype(d) for d in ("<f2", "<f4", "<f8", "<i4", "<i8")]


@fuzz_loading
@given(st.data())
def test_edited_tensors_with_checksum_fixed(work: dict[str, Any], data: st.DataObject) -> None:
    header, arrays = read_model_file(work["a_path"])
    arrays = {k: np.array(v) for k, v in arrays.items()}
    name = data.draw(st.sampled_from(sorted(arrays)))
    array = arrays[name]
    action = data.draw(st.sampled_from(["drop", "add", "retype", "flatten", "cut", "values", "empty"]))
    if action == "drop":
        del arrays[name]
    elif action == "add":
        arrays[data.draw(st.sampled_from(["level_9", "order_2", "extra", "level_2"]))] = array
    elif action == "retype":
        arrays[name] = array.astype(data.draw(st.sampled_from(_DTYPES)))
    elif action == "flatten":
        arrays[name] = array.reshape(-1)
    elif action == "cut":
        arrays[name] = array[: data.draw(st.integers(0, max(0, len(array) - 1)))]
    elif action == "empty":
        arrays[name] = np.zeros((0, *array.shape[1:]), array.dtype)
    else:  # rewrite some values (shapes, orders and features alike): in range, out of range, negative, NaN
        flat = arrays[name].reshape(-1)
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, flat.size - 1))
            new = data.draw(st.sampled_from([-1, 0, 1, 2, 7, 1000, 2**31 - 1, float("nan"), float("inf")]))
            with np.errstate(over="ignore"):
                flat[index] = new if array.dtype.kind == "f" or isinstance(new, int) else 0
    outcome(work, "edited tensors, checksum fixed", path=_rewritten(work, header, arrays))


def test_the_unchanged_file_loads(work: dict[str, Any]) -> None:
    assert outcome(work, "unchanged", work["a"]) == "loaded"
    header, arrays = read_model_file(work["a_path"])
    rewritten = _rewritten(work, header, {k: np.asarray(v) for k, v in arrays.items()})
    assert outcome(work, "unchanged", path=rewritten) == "loaded"
