"""The built-in Sort-of-CLEVR `shapes`: answers and captions checked against the pixels."""

import numpy as np
import pytest

from mmtune.data.builtin import shapes


def _objects_from_pixels(img: np.ndarray) -> list[tuple[float, float, str]]:
    """(x, y, shape) per colour, read back from the image: centroid and area (circle < square)."""
    out = []
    for rgb in shapes.RGB:
        ys, xs = np.nonzero((img == np.array(rgb, np.uint8)).all(-1))
        area = len(xs)
        assert area > 0
        out.append(
            (
                xs.mean(),
                ys.mean(),
                "square" if area == (2 * shapes.OBJECT_SIZE + 1) ** 2 else "circle",
            )
        )
    return out


def _reference_answer(qtype: str, colour: int, objs) -> str:
    x, y, shape = objs[colour]
    d = [(ox - x) ** 2 + (oy - y) ** 2 for ox, oy, _ in objs]
    if qtype == "nonrel.shape":
        return shape
    if qtype == "nonrel.horizontal":
        return "left" if x < 37.5 else "right"
    if qtype == "nonrel.vertical":
        return "top" if y < 37.5 else "bottom"
    if qtype == "rel.closest":
        return objs[min((v, k) for k, v in enumerate(d) if k != colour)[1]][2]
    if qtype == "rel.furthest":
        return objs[max((v, k) for k, v in enumerate(d))[1]][2]
    return str(sum(o[2] == shape for o in objs))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    arrays = shapes.generate(30, seed=7)
    return arrays, shapes.scene_records(arrays, "train")


def test_scene_layout(scenes):
    arrays, records = scenes
    assert arrays["images"].shape == (30, 75, 75, 3) and arrays["images"].dtype == np.uint8
    assert len(records) == 30 * 20
    kinds = [r.question_type.split(".")[0] for r in records[:20]]
    assert kinds.count("nonrel") == 10 and kinds.count("rel") == 10
    assert all(r.question_type for r in records)
    for r in records:
        assert r.answers[0] in shapes.ANSWERS


def test_answers_and_captions_match_the_pixels(scenes):
    arrays, records = scenes
    for r in records:
        i = int(r.image_id.split("-")[1])
        objs = _objects_from_pixels(arrays["images"][i])
        colour = next(k for k, c in enumerate(shapes.COLORS) if f" {c} object" in r.question)
        assert r.answers[0] == _reference_answer(r.question_type, colour, objs), r.question
        for k, c in enumerate(shapes.COLORS):
            x, y, shape = objs[k]
            pos = f"{'top' if y < 37.5 else 'bottom'} {'left' if x < 37.5 else 'right'}"
            assert f"{c} {shape} at the {pos}" in r.captions[0]


def test_deterministic_by_seed_and_cached(tmp_path, monkeypatch):
    a, b = shapes.generate(5, seed=3), shapes.generate(5, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images"], shapes.generate(5, seed=4)["images"])
    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(shapes.SIZES, "shapes-mini", (4, 2, 2))
    first = shapes.load_arrays("shapes-mini", 0)
    assert len(list(tmp_path.glob("shapes-*.npz"))) == 1
    again = shapes.load_arrays("shapes-mini", 0)
    assert np.array_equal(first["test"]["images"], again["test"]["images"])
    assert first["train"]["images"].shape[0] == 4
