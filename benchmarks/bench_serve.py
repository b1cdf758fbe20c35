"""``deepscope serve`` as a user meets it: stroke-to-overlay latency of the live pixel classifier, several users at
once, and tile serving of a large image, through a real server process and HTTP, on this machine's cores.

Images are mosaics of ISBI 2012 EM slices (512x512 each): 1024x1024 (2x2), 4096x4096 (8x8) and 8192x8192 (16x16, tiles
only). Strokes are drawn where the dense labels say membrane (class 1) or cell interior (class 2), 24 px long, radius 2,
alternating classes, inside the region the simulated user sees.

A stroke's latency is what the page waits for: the stroke request (the server makes the stroke durable, refits the
forest on every labelled pixel and predicts the visible region) plus the probability overlay tiles of that region,
fetched 6 at a time like the browser. "Whole image" is until the background pass has predicted every pixel. "Cold" is
the first stroke that gives a second class, which computes the image's features (the project's default set, 25
filters); "warm" are the strokes after it. The reference is the command line loop the issue names: ``deepscope pixel
train`` rerun on the same labels with its features cached (its defaults: 49 features, 100 trees; one process per
iteration, as ``bench_pixel_iteration.py`` measures it).

``--soak`` (its own section): 8 users for 2 minutes, each painting their own image and panning image tiles, then the
server killed with ``kill -9`` while requests are still in flight; every acknowledged stroke is then looked up in
what the server left (label files and journals, read back as a restarted server reads them).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from common import CACHE, SHARED, command_line, header, write_section
from deepscope.data.scribbles import dense_classes
from deepscope.serve.folder import ServedFolder
from deepscope.serve.labels import LabelStore, Stroke

TILE = 256
FETCHERS = 6  # tiles the page requests at once
STROKE_LENGTH, RADIUS = 24, 2


def mosaic(kind: str, side: int, first: int = 0) -> np.ndarray:
    """side x side grid of ISBI slices (``kind`` images or labels), cycling through the 25 shared slices."""
    slices = [
        np.asarray(Image.open(SHARED / "isbi2012_em" / kind / f"{(first + i) % 25:02d}.png"))
        for i in range(side * side)
    ]
    return np.block([[slices[r * side + c] for c in range(side)] for r in range(side)])


class Server:
    """``deepscope serve FOLDER --port 0`` in its own process; its address is read from what it prints."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deepscope", "serve", str(folder), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.process.stdout.readline()
        match = re.search(r"http://\S+:(\d+)/", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"deepscope serve did not start: {line}{self.process.stdout.read()}")
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def peak_rss_mb(self) -> float:
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(30)


def fresh_folder(name: str, images: dict[str, np.ndarray]) -> Path:
    """A folder holding only ``images`` (no labels, no cached features)."""
    root = CACHE / "serve" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for file, image in images.items():
        tifffile.imwrite(root / file, image)
    return root


class Painter:
    """Strokes of a given class inside a region, where the dense labels have that class all along the stroke."""

    def __init__(self, classes: np.ndarray, seed: int) -> None:
        self.inside = [ndimage.binary_erosion(classes == c, iterations=RADIUS + 1) for c in (1, 2)]
        self.rng = np.random.default_rng(seed)

    def stroke(self, label: int, region: tuple[int, int, int, int]) -> dict:
        y0, y1, x0, x1 = region
        mask = self.inside[label - 1]
        for _ in range(100):
            n = 256
            starts = np.stack(
                [
                    self.rng.integers(y0 + STROKE_LENGTH, y1 - STROKE_LENGTH, n),
                    self.rng.integers(x0 + STROKE_LENGTH, x1 - STROKE_LENGTH, n),
                ],
                1,
            )
            angles = self.rng.uniform(0, 2 * np.pi, n)
            steps = np.arange(0, STROKE_LENGTH + 1, 2)
            ys = np.rint(starts[:, :1] + np.sin(angles)[:, None] * steps).astype(int)
            xs = np.rint(starts[:, 1:] + np.cos(angles)[:, None] * steps).astype(int)
            good = np.flatnonzero(mask[ys, xs].all(axis=1))
            if len(good):
                i = good[0]
                return {
                    "points": [[int(ys[i, 0]), int(xs[i, 0])], [int(ys[i, -1]), int(xs[i, -1])]],
                    "radius": RADIUS,
                    "label": label,
                }
        raise SystemExit(f"no room for a stroke of class {label} in {region}")


def overlay_tiles(
    client: httpx.Client,
    image: str,
    region: tuple[int, int, int, int],
    level: int,
    version: str,
    pool: concurrent.futures.Executor,
) -> None:
    """Fetch the probability overlay tiles that show ``region`` at ``level``, FETCHERS at a time."""
    span = TILE * 2**level
    y0, y1, x0, x1 = region
    tiles = [
        (ty, tx) for ty in range(y0 // span, (y1 - 1) // span + 1) for tx in range(x0 // span, (x1 - 1) // span + 1)
    ]

    def get(tile: tuple[int, int]) -> None:
        response = client.get(
            "/api/overlay",
            params={
                "image": image,
                "kind": "probabilities",
                "level": level,
                "ty": tile[0],
                "tx": tile[1],
                "v": version,
            },
        )
        response.raise_for_status()

    list(pool.map(get, tiles))


def settle(client: httpx.Client, image: str) -> None:
    """Until the background pass has predicted the whole image."""
    while True:
        status = client.get("/api/status", params={"image": image}).json()
        if status["predicted"] >= 1.0 and not status["busy"]:
            return
        time.sleep(0.02)


def stroke_latency(
    client: httpx.Client,
    image: str,
    stroke: dict,
    region: tuple[int, int, int, int],
    level: int,
    pool: concurrent.futures.Executor,
    whole: bool,
) -> tuple[float, float | None]:
    """(seconds to the visible overlay, seconds until the whole image is predicted or None)."""
    start = time.perf_counter()
    response = client.post(
        "/api/stroke", params={"image": image}, json={**stroke, "visible": list(region), "level": level}
    )
    response.raise_for_status()
    reply = response.json()
    overlay_tiles(client, image, region, level, f"{reply['model']}.{reply['labels_version']}", pool)
    visible = time.perf_counter() - start
    if not whole:
        return visible, None
    settle(client, image)
    return visible, time.perf_counter() - start


def percentiles(values: list[float]) -> str:
    return f"{np.percentile(values, 50):.2f} / {np.percentile(values, 95):.2f}"


def latency_rows(side: int, warm_strokes: int, colds: int) -> list[str]:
    """Rows for one image size: the visible 1024x1024 region at full resolution, and the whole image seen at the
    zoom where it fits 1024x1024 screen pixels."""
    image = mosaic("images", side)
    classes = dense_classes(mosaic("labels", side))
    size = 512 * side
    views = {"visible 1024x1024 region": ((0, 1024, 0, 1024), 0)}
    if size > 1024:
        views["whole image on a 1024x1024 screen"] = ((0, size, 0, size), int(np.log2(size // 1024)))
    rows = []
    for view, (region, level) in views.items():
        cold, warm, whole = [], [], []
        for repeat in range(colds):
            folder = fresh_folder(f"latency{size}", {"em.tif": image})
            server = Server(folder)
            painter = Painter(classes, seed=repeat)
            try:
                with concurrent.futures.ThreadPoolExecutor(FETCHERS) as pool:
                    server.client.post(
                        "/api/stroke",
                        params={"image": "em.tif"},
                        json={**painter.stroke(1, region), "visible": list(region), "level": level},
                    ).raise_for_status()
                    cold.append(
                        stroke_latency(server.client, "em.tif", painter.stroke(2, region), region, level, pool, False)[
                            0
                        ]
                    )
                    settle(server.client, "em.tif")
                    if repeat == 0:
                        for i in range(warm_strokes):
                            visible, done = stroke_latency(
                                server.client,
                                "em.tif",
                                painter.stroke(1 + i % 2, region),
                                region,
                                level,
                                pool,
                                whole=True,
                            )
                            warm.append(visible)
                            whole.append(done)
            finally:
                server.close()
        rows.append(
            f"| {size}x{size} | {view} (level {level}) | {np.median(cold):.2f} ({colds}) | {percentiles(warm)} "
            f"({len(warm)}) | {percentiles(whole)} |"
        )
    return rows


def cli_rerun(side: int) -> float:
    """``deepscope pixel train`` rerun with new strokes and cached features, whole process, on the same image and
    the labels of the latency run."""
    folder = CACHE / "serve" / f"latency{512 * side}"
    run = CACHE / "serve" / "cli-run"
    shutil.rmtree(run, ignore_errors=True)
    command = [
        "deepscope",
        "pixel",
        "train",
        "--images",
        str(folder / "em.tif"),
        "--labels",
        str(folder / "labels"),
        "--out",
        str(run),
    ]
    subprocess.run(command, capture_output=True, check=True)  # computes and caches the features
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - start


def load_rows(users: int, strokes: int) -> list[str]:
    """``users`` at once, each labelling their own 1024x1024 image; every stroke checked on disk afterwards."""
    images = {f"user{u}.tif": mosaic("images", 2, first=4 * u) for u in range(users)}
    painters = [Painter(dense_classes(mosaic("labels", 2, first=4 * u)), seed=u) for u in range(users)]
    folder = fresh_folder("load", images)
    server = Server(folder)
    region = (0, 1024, 0, 1024)
    latencies: list[tuple[int, float]] = []  # (stroke number of its user, seconds)
    failures = 0

    def user(u: int) -> list[dict]:
        nonlocal failures
        done = []
        with (
            httpx.Client(base_url=server.url, timeout=600) as client,
            concurrent.futures.ThreadPoolExecutor(FETCHERS) as pool,
        ):
            for i in range(strokes):
                stroke = painters[u].stroke(1 + i % 2, region)
                try:
                    latencies.append((i, stroke_latency(client, f"user{u}.tif", stroke, region, 0, pool, False)[0]))
                    done.append(stroke)
                except httpx.HTTPError:
                    failures += 1
                time.sleep(0.5)  # the user looks at the result before the next stroke
        return done

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        painted = list(pool.map(user, range(users)))
    wall = time.perf_counter() - start
    rss = server.peak_rss_mb()
    server.close()  # writes every label file
    lost = 0
    for u, done in enumerate(painted):
        labels = tifffile.imread(folder / "labels" / f"user{u}.tif")
        lost += sum(labels[p[0], p[1]] != s["label"] for s in done for p in s["points"])
    warm = [seconds for i, seconds in latencies if i >= 2]  # a user's first two strokes compute its image's features
    return [
        (
            f"| {users} users x {strokes} strokes, 1024x1024 each, 0.5 s between strokes | {percentiles(warm)} | "
            f"{max(s for _, s in latencies):.2f} | {failures} | {lost} | {wall:.0f} s | {rss:,.0f} MB |"
        )
    ]


def pan(server: Server, level: int) -> str:
    """Tiles per second (and tiles) while a 1920x1080 view at ``level`` moves 40 steps of 200 screen pixels
    diagonally across the 8192x8192 image, fetching the new tiles of each step FETCHERS at a time."""
    span, scale = TILE * 2**level, 2**level
    seen: set[tuple[int, int]] = set()

    def get(tile: tuple[int, int]) -> None:
        server.client.get(
            "/api/tile", params={"image": "em8192.tif", "level": level, "ty": tile[0], "tx": tile[1]}
        ).raise_for_status()

    fetched, start = 0, time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(FETCHERS) as pool:
        for step in range(40):
            y0, x0 = step * 100 * scale, step * 200 * scale
            wanted = [
                (ty, tx)
                for ty in range(y0 // span, min(8192, y0 + 1080 * scale) // span + 1)
                for tx in range(x0 // span, min(8192, x0 + 1920 * scale) // span + 1)
                if ty * span < 8192 and tx * span < 8192 and (ty, tx) not in seen
            ]
            seen.update(wanted)
            list(pool.map(get, wanted))
            fetched += len(wanted)
    return f"{fetched / (time.perf_counter() - start):.0f} ({fetched})"


def tile_rows() -> list[str]:
    """Time to the first tile of an 8192x8192 image (page opened: top level; zoomed to full resolution), then
    panning at full resolution and at level 2, with a fresh server per row."""
    folder = fresh_folder("tiles", {"em8192.tif": mosaic("images", 16)})
    rows = []
    for name, first_level in (("fitted view (level 5)", 5), ("full resolution (level 0)", 0)):
        server = Server(folder)
        start = time.perf_counter()
        server.client.get("/api/info", params={"image": "em8192.tif"}).raise_for_status()
        server.client.get(
            "/api/tile", params={"image": "em8192.tif", "level": first_level, "ty": 0, "tx": 0}
        ).raise_for_status()
        first = time.perf_counter() - start
        rows.append(
            f"| {name} | {first:.2f} s | {pan(server, 0)} | {pan(server, 2)} | {server.peak_rss_mb():,.0f} MB |"
        )
        server.close()
    return rows


class SoakUser:
    """One simulated user of the soak run: strokes on their own image, each followed by the overlay tiles of the
    viewed region and a few image tiles elsewhere (panning), 0.5 s apart, until ``stop``."""

    def __init__(self, url: str, number: int, painter: Painter, stop: threading.Event) -> None:
        self.url, self.image, self.painter, self.stop = url, f"user{number}.tif", painter, stop
        self.rng = np.random.default_rng(100 + number)
        self.acknowledged: list[dict] = []
        self.sent = self.failed = self.unanswered = 0
        self.stroke_s: list[float] = []  # stroke to its overlay tiles loaded
        self.tile_s: list[float] = []  # one image tile

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                y, x = (int(v) for v in self.rng.integers(0, 2, 2) * 512)
                region = (y, y + 512, x, x + 512)
                stroke = self.painter.stroke(1 + self.sent % 2, region)
                self.sent += 1
                start, acknowledged = time.perf_counter(), False
                try:
                    reply = client.post(
                        "/api/stroke", params={"image": self.image}, json={**stroke, "visible": list(region)}
                    )
                    reply.raise_for_status()
                    self.acknowledged.append(stroke)
                    acknowledged = True
                    version = f"{reply.json()['model']}.{reply.json()['labels_version']}"
                    for ty in range(y // TILE, (y + 512) // TILE):
                        for tx in range(x // TILE, (x + 512) // TILE):
                            client.get(
                                "/api/overlay",
                                params={
                                    "image": self.image,
                                    "kind": "probabilities",
                                    "level": 0,
                                    "ty": ty,
                                    "tx": tx,
                                    "v": version,
                                },
                            ).raise_for_status()
                    self.stroke_s.append(time.perf_counter() - start)
                    level = int(self.rng.integers(0, 3))
                    for ty, tx in self.rng.integers(0, 1024 // (TILE * 2**level), (4, 2)):
                        tile = time.perf_counter()
                        client.get(
                            "/api/tile", params={"image": self.image, "level": level, "ty": int(ty), "tx": int(tx)}
                        ).raise_for_status()
                        self.tile_s.append(time.perf_counter() - tile)
                except httpx.HTTPError:
                    if self.stop.is_set():  # the server was killed under this request
                        self.unanswered += not acknowledged
                        return
                    self.failed += 1
                self.stop.wait(0.5)


def soak_rows(users: int, seconds: float) -> tuple[list[str], int]:
    """``users`` at once for ``seconds``, then ``kill -9``; every acknowledged stroke checked in what the server
    left. The table row, and the number of acknowledged strokes lost (0 expected)."""
    images = {f"user{u}.tif": mosaic("images", 2, first=3 * u) for u in range(users)}
    painters = [Painter(dense_classes(mosaic("labels", 2, first=3 * u)), seed=u) for u in range(users)]
    folder = fresh_folder("soak", images)
    server = Server(folder)
    stop = threading.Event()
    simulated = [SoakUser(server.url, u, painters[u], stop) for u in range(users)]
    threads = [threading.Thread(target=user.run) for user in simulated]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    rss = server.peak_rss_mb()
    stop.set()
    os.kill(server.process.pid, signal.SIGKILL)  # requests still in flight: their strokes are not acknowledged
    server.process.wait()
    for thread in threads:
        thread.join()
    store = LabelStore(ServedFolder(folder))  # as a restarted server: label files, then the journals replayed
    lost = 0
    for u, user in enumerate(simulated):
        labels = store.labels(f"user{u}.tif")
        for stroke in user.acknowledged:
            box, mask = Stroke([tuple(p) for p in stroke["points"]], stroke["radius"], stroke["label"]).raster(
                labels.shape
            )
            lost += bool((labels[box][mask] != stroke["label"]).any())  # strokes of the other class never overlap
    store.close()
    strokes = [s for user in simulated for s in user.stroke_s[2:]]  # a user's first two strokes compute the features
    tiles = [s for user in simulated for s in user.tile_s]
    sent, acknowledged = sum(u.sent for u in simulated), sum(len(u.acknowledged) for u in simulated)
    row = (
        f"| {users} users x {seconds:.0f} s, then kill -9 | {sent} / {acknowledged} / {lost} | "
        f"{sum(u.unanswered for u in simulated)} | {sum(u.failed for u in simulated)} | {percentiles(strokes)} "
        f"({len(strokes)}) | {1000 * np.percentile(tiles, 50):.0f} / {1000 * np.percentile(tiles, 95):.0f} ({len(tiles)}) | "
        f"{rss:,.0f} MB |"
    )
    return [row], lost


def soak() -> None:
    """``--soak``: its own section of RESULTS.md (the other figures take much longer to measure)."""
    seconds = 20.0 if "--quick" in sys.argv else 120.0
    load = os.getloadavg()[0]  # other work on the machine, which the figures share the cores with
    rows, lost = soak_rows(8, seconds)
    text = "\n".join(
        [
            header(command_line()),
            (
                f"8 simulated users on 127.0.0.1, each labelling their own 1024x1024 image (ISBI EM mosaic) for {seconds:.0f} s: "
                "a stroke (radius 2, alternating classes) in a 512x512 region they look at, the 4 probability overlay "
                "tiles of that region, then 4 image tiles at a random level (panning), 0.5 s between strokes. Server and "
                f"users share the machine's {os.cpu_count()} cores (1-minute load average {load:.1f} when the run started). "
                "At the end the server is killed with `kill -9` while requests are in flight; the label files and journals it "
                "left are read back as a restarted server reads them, and every acknowledged stroke is looked up there pixel "
                "by pixel.\n"
            ),
            (
                "| run | strokes sent / acknowledged / lost | strokes unanswered (in flight at the kill) | failed requests | stroke to "
                "overlay p50 / p95 s (strokes) | image tile p50 / p95 ms (tiles) | server peak memory |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    print(text)
    if "--quick" not in sys.argv:
        write_section("serve-soak", "deepscope serve: 8 users for 2 minutes, then kill -9 (CPU)", text)
    if lost:
        raise SystemExit(f"{lost} acknowledged stroke(s) lost")


def main() -> None:
    if "--soak" in sys.argv:
        soak()
        return
    quick = "--quick" in sys.argv  # fewer repetitions, to check the script
    latency = latency_rows(2, 6 if quick else 30, 1 if quick else 3)
    latency += latency_rows(8, 3 if quick else 10, 1 if quick else 2)
    rerun = cli_rerun(2)
    load = load_rows(4, 4 if quick else 12)
    tiles = tile_rows()
    lines = [
        header(command_line()),
        (
            f"Server: `deepscope serve` (uvicorn, one process), client on the same machine; {os.cpu_count()} cores shared by "
            "both. Seconds; p50 / p95 with the number of strokes in brackets.\n"
        ),
        (
            "| image | view | cold: first fit, features computed (runs) | warm: stroke to overlay p50 / p95 | warm: stroke to "
            "whole image predicted p50 / p95 |"
        ),
        "| --- | --- | --- | --- | --- |",
        *latency,
        (
            f"\nThe command-line loop on the 1024x1024 image (`deepscope pixel train` rerun with new strokes, features "
            f"cached, its defaults of 49 features and 100 trees, predicts the whole image): **{rerun:.1f} s** per "
            "iteration.\n"
        ),
        (
            "Several users at once (each user's first two strokes, which compute the features of their image, left out of "
            "the percentiles; every acknowledged stroke checked in the label files after the server stopped):\n"
        ),
        "| load | stroke to overlay p50 / p95 | slowest | failed requests | strokes lost | wall | server peak memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *load,
        (
            "\nTile serving, 8192x8192 uint8 TIFF (64 MB), fresh server each row; panning = 40 steps of 200 screen pixels "
            "with a 1920x1080 view, new tiles only, 6 requests at a time:\n"
        ),
        (
            "| first view | time to first tile (image opened, pyramid levels pooled) | panning at level 0: tiles/s (tiles) | "
            "panning at level 2: tiles/s (tiles) | server peak memory |"
        ),
        "| --- | --- | --- | --- | --- |",
        *tiles,
    ]
    text = "\n".join(lines)
    print(text)
    if not quick:
        write_section("serve", "deepscope serve: live labelling latency, users at once, tile serving (CPU)", text)


if __name__ == "__main__":
    main()
