"""A bounded load test of ``deepscope serve`` on localhost: several simulated users label different images at once
through a real server process; no request fails, every acknowledged stroke is in the label files the server leaves,
and each user's image gets predictions of the classes it painted. (Latency under load is a benchmark figure:
``benchmarks/bench_serve.py``.)"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import tifffile

from conftest import start_server
from deepscope.serve.labels import Stroke

USERS, STROKES = 4, 6
SHAPE = (96, 128)


def user_image(seed: int) -> np.ndarray:
    """Dark left half, bright right half, with noise: class 1 strokes go left, class 2 right."""
    image = np.random.default_rng(seed).integers(20, 60, SHAPE).astype(np.uint8)
    image[:, SHAPE[1] // 2 :] += 150
    return image


def strokes_of(user: int) -> list[dict]:
    """The user's strokes: alternating classes at rows that differ between strokes and users, so none repaints
    another's pixels."""
    strokes = []
    for i in range(STROKES):
        y = 8 + 14 * i + user
        x0 = 6 if i % 2 == 0 else 70
        strokes.append({"points": [[y, x0], [y, x0 + 40]], "radius": 2, "label": 1 + i % 2})
    return strokes


def test_users_at_once_lose_nothing(tmp_path: Path) -> None:
    for user in range(USERS):
        tifffile.imwrite(tmp_path / f"user{user}.tif", user_image(user))
    server, url = start_server(tmp_path)
    try:

        def label(user: int) -> list[dict]:
            """One user's session: every stroke followed by the overlay tile of the visible image; replies kept."""
            image = f"user{user}.tif"
            replies = []
            with httpx.Client(base_url=url, timeout=120) as client:
                for stroke in strokes_of(user):
                    reply = client.post(
                        "/api/stroke", params={"image": image}, json={**stroke, "visible": [0, SHAPE[0], 0, SHAPE[1]]}
                    )
                    assert reply.status_code == 200, reply.text
                    replies.append(reply.json())
                    tile = client.get(
                        "/api/overlay", params={"image": image, "kind": "classes", "level": 0, "ty": 0, "tx": 0}
                    )
                    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png", tile.text
                status = client.get("/api/status", params={"image": image}).json()
            assert status["classes"] == [1, 2]
            return replies

        with concurrent.futures.ThreadPoolExecutor(USERS) as pool:
            replies = list(pool.map(label, range(USERS)))
    finally:
        server.terminate()  # uvicorn shuts the app down (pending label files are written), then passes SIGTERM on
        assert server.wait(60) in (0, -15), server.stdout.read()

    for user, answers in enumerate(replies):
        # each stroke acknowledged in order
        assert [a["labels_version"] for a in answers] == list(range(1, STROKES + 1))
        expected = np.zeros(SHAPE, np.uint8)
        for stroke in strokes_of(user):
            box, mask = Stroke([tuple(p) for p in stroke["points"]], stroke["radius"], stroke["label"]).raster(SHAPE)
            expected[box][mask] = stroke["label"]
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels" / f"user{user}.tif"), expected)
