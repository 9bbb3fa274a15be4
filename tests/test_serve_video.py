"""/v1/embed with a video upload, over real HTTP (uvicorn on a loopback port) from a trained
video-contrastive run: the embedding is the run's own `encode_video`; oversized, too long, too
large-framed, empty and undecodable uploads get JSON 4xx errors and the server keeps serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mmtune import api
from mmtune.config import load_config
from mmtune.data.formats import Record
from mmtune.data.video import write_video
from mmtune.serve import Backend, ServeConfig, create_app
from tests.conftest import tiny_overrides
from tests.test_serve import LiveServer, wait_ready
from tests.test_video import _clip

pytest.importorskip("av")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A video-contrastive run (tiny-clip, temporal transformer, 2 steps) and a live server on it."""
    root = tmp_path_factory.mktemp("serve-video")
    folder = root / "clips"
    folder.mkdir()
    rows = ["video,caption"]
    for i in range(8):
        write_video(folder / f"c{i}.mp4", _clip(8 + i % 3, i))
        rows.append(f"c{i}.mp4,clip number {i % 4}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    over = tiny_overrides(root, task="video-contrastive", **{"data.dataset": str(folder / "pairs.csv")})
    over.update({"data.image_column": "video", "data.frames": 4, "data.frame_pool": 8, "data.batch_size": 4})
    over.update({"data.val_fraction": 0.25, "options.temporal_layers": 1, "train.max_steps": 2})
    cfg = load_config(None, over)
    api.train(cfg)
    write_video(root / "long.mp4", _clip(40, 1), fps=8)  # 5 s
    write_video(root / "wide.mp4", _clip(4, 2, size=64))  # 64×64 frames
    limits = ServeConfig(max_body_bytes=60_000, max_video_seconds=2.0, max_image_pixels=48 * 48)
    with LiveServer(create_app(Backend.from_run(cfg.run_dir), limits)) as s:
        wait_ready(s.url)
        yield {"root": root, "clips": folder, "run": cfg.run_dir, "url": s.url}


def _post(world, data: bytes, field: str = "video"):
    return httpx.post(world["url"] + "/v1/embed", files={field: ("clip.mp4", data)}, timeout=60)


def test_video_upload_embeds_as_the_run_does(world):
    """The server's vector for a clip equals the reopened run's own embed_videos on that file."""
    from mmtune.runs import open_run

    path = world["clips"] / "c3.mp4"
    r = _post(world, path.read_bytes())
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"])
    task, model = open_run(world["run"])
    want = task.embed_videos(model.eval(), [Record(image=str(path))]).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    other = np.array(_post(world, (world["clips"] / "c6.mp4").read_bytes()).json()["embeddings"])
    assert not np.allclose(other, got)  # a different clip, a different vector


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"\x00not a video at all" * 100, 415, "not a video"),
        (b"", 422, "empty"),
        ("long.mp4", 413, "too_long"),
        ("wide.mp4", 413, "too_large"),
        (b"\x00" * 70_000, 413, "larger than"),
    ],
    ids=["garbage", "empty", "too-long", "frames-too-large", "body-too-large"],
)
def test_bad_video_uploads_get_json_errors_and_the_server_keeps_serving(world, payload, status, words):
    """Each refused upload is a JSON 4xx naming why; a good clip right after still embeds."""
    data = (world["root"] / payload).read_bytes() if isinstance(payload, str) else payload
    r = _post(world, data)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and words in body["error"]
    assert _post(world, (world["clips"] / "c0.mp4").read_bytes()).status_code == 200


def test_an_image_and_a_video_at_once_is_refused(world):
    """One file per request: two uploads are a JSON 400."""
    files = {"video": ("a.mp4", (world["clips"] / "c0.mp4").read_bytes()), "image": ("b.png", b"x")}
    r = httpx.post(world["url"] + "/v1/embed", files=files, timeout=60)
    assert r.status_code == 400 and r.json()["status"] == 400
