"""Shared fixtures: small synthetic data sets written to disk, and the shared real data when present."""

from __future__ import annotations

import errno
import fnmatch
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepscope.engine.precision import cpu_description, cpu_native_bf16

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SLOW_ENV = "DEEPSCOPE_SLOW_TESTS"

# bf16 on a CPU that only emulates it is many times slower than float32: such paths are tested where they are native
needs_native_bf16 = pytest.mark.skipif(
    not cpu_native_bf16(),
    reason=f"this CPU ({cpu_description()}) only emulates bf16; bf16 paths are tested where it is native",
)


EXIT_STATUS = pytest.StashKey[int]()  # pytest's exit status, kept for pytest_unconfigure


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help=f"also run tests marked slow (or set {SLOW_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"slow: end-to-end run of minutes, only with --slow or {SLOW_ENV}=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or os.environ.get(SLOW_ENV, "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason=f"slow end-to-end test: run with --slow or {SLOW_ENV}=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pattern_images(n_per_class: int, size: int = 12, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Easily separable classes: a bright bar at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(classes):
        for _ in range(n_per_class):
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            start = label * size // classes
            image[start : start + size // classes, :, label % 3] = 220
            images.append(image)
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """``train/`` and ``test/`` class-folder trees of 12x12 RGB PNGs, 3 classes."""
    names = ["alpha", "beta", "gamma"]
    x, y = pattern_images(40, seed=0)
    write_tree(tmp_path / "data" / "train", x, y, names)
    x, y = pattern_images(10, seed=1)
    write_tree(tmp_path / "data" / "test", x, y, names)
    return tmp_path / "data"


@pytest.fixture
def npz_data(tmp_path: Path) -> Path:
    x, y = pattern_images(40, seed=0)
    xt, yt = pattern_images(10, seed=1)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, class_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data sets not found at {SHARED} (../shared/data beside the checkout)")
    return SHARED


def fit_batch(model, x, target, loss_fn, steps: int, lr: float, optimizer=None) -> list[float]:
    """Train ``model`` on one batch for ``steps`` optimizer steps (for tests that a model can overfit); the losses."""
    import torch

    opt = (optimizer or torch.optim.AdamW)(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_args(task: str, data: Path, out: Path, epochs: int, *options: str) -> list[str]:
    """``train TASK`` on ``data`` for ``epochs`` into ``out``; ``options`` follow."""
    return ["train", task, "--data", str(data), "--out", str(out), "--epochs", str(epochs), *options]


# the options of a tiny CenterNet detector run through ``train detect``: a few seconds an epoch on the CPU
TINY_CENTERNET = [
    "--model",
    "centernet",
    "--batch-size",
    "4",
    "--amp",
    "off",
    "--set",
    "image_size=0",
    "--set",
    "model_args={backbone: tiny, fpn_channels: 16}",
    "--set",
    "augment.crop=0",
]


def fast_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A small, quick CPU training run through the CLI, in float32 (``--amp off``) on every processor, so figures
    compare exactly between runs, processes and ``evaluate``; a later ``--amp`` in ``extra`` wins."""
    return [
        "train",
        "classify",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "cnn",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--optimizer",
        "adamw",
        "--device",
        "cpu",
        "--amp",
        "off",
        "--set",
        "model_args.widths=[8,16]",
        *extra,
    ]


def cpu_unet_options(
    *, batch_size: int, lr: float, depth: int, patch: int, patches_per_epoch: int, val_fraction: float
) -> list[str]:
    """The options of a small, quick CPU U-Net run through the CLI (segment, denoise), in float32 (``--amp off``): a
    U-Net of 8 features and ``depth`` levels on square patches of ``patch`` pixels."""
    return [
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
        "--amp",
        "off",
        "--lr",
        str(lr),
        "--set",
        f"model_args={{features: 8, depth: {depth}}}",
        "--set",
        f"patch_shape=[{patch}, {patch}]",
        "--set",
        f"patches_per_epoch={patches_per_epoch}",
        "--set",
        f"val_fraction={val_fraction}",
    ]


def two_process_launcher(master_port: int) -> list[str]:
    """The start of a command line running ``deepscope`` in 2 processes by ``torch.distributed.run`` with its master on
    ``master_port``; the deepscope arguments follow it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(master_port),
        "-m",
        "deepscope",
    ]


def evaluate_checkpoint_args(checkpoint: Path, data: Path, out: Path, *options: str) -> list[str]:
    """``evaluate`` of ``checkpoint`` on the CPU on the data set ``data``, its scores written to ``out``; ``options``
    (``--split``, ``--save-pred``, ``--tta``) stand before ``--out``."""
    return ["evaluate", str(checkpoint), "--data", str(data), *options, "--out", str(out), "--device", "cpu"]


def evaluate_saved_args(task: str, pred: Path, truth: Path, out: Path, *options: str) -> list[str]:
    """``evaluate TASK`` of saved predictions ``pred`` against ``truth``, its scores written to ``out``; ``options``
    stand before ``--out``."""
    return ["evaluate", task, "--pred", str(pred), "--truth", str(truth), *options, "--out", str(out)]


def rgba(response) -> np.ndarray:
    """The pixels of a PNG answer of ``deepscope serve`` (checked to be one)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def written_name(path: str | Path) -> str:
    """The name of the file an atomic write of ``path`` (its temporary file, :func:`deepscope.atomic.temporary`) makes."""
    return Path(path).name[1:].rsplit(".tmp-", 1)[0] if ".tmp-" in Path(path).name else Path(path).name


class FullDisk:
    """Atomic writes (:func:`deepscope.atomic.atomic_write`) of files matching ``pattern`` fail as on a full disk:
    half their bytes reach the temporary file, then ENOSPC. ``space_back()`` lets writes succeed again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pattern: str) -> None:
        from deepscope import atomic

        self.full, self.failures = True, 0

        def opener(path, mode="r", *args, **kwargs):
            handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (returned to the writer, which closes it)
            if not (self.full and "w" in mode and fnmatch.fnmatch(written_name(path), pattern)):
                return handle
            write = handle.write

            def filling(data):
                write(bytes(data)[: max(1, len(data) // 2)])
                self.failures += 1
                raise OSError(errno.ENOSPC, "No space left on device")

            handle.write = filling
            return handle

        monkeypatch.setattr(atomic, "open", opener, raising=False)

    def space_back(self) -> None:
        self.full = False


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """``full_disk("*.pt")``: a :class:`FullDisk` for the files matching the pattern."""
    return lambda pattern="*": FullDisk(monkeypatch, pattern)


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``deepscope serve FOLDER`` in its own process on a free port, and the address it printed (``http://...:N/``)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "deepscope", "serve", str(folder), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = server.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not url:
        server.kill()
        raise AssertionError(line + server.stdout.read())
    return server, url.group(0)


def last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    """The JSON a command printed on its last line of stdout."""
    import json

    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail: exit code 2 and one line on stderr, no traceback; the line."""
    from deepscope.cli import main

    capsys.readouterr()  # what the test printed before (warnings of its own set-up) is not the command's
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.fixture(scope="session")
def small_nuclei(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated nuclei: 8 training and 2 test images of 96 pixels."""
    from deepscope.demo.data import write_nuclei

    return write_nuclei(tmp_path_factory.mktemp("small_nuclei") / "data", train=8, test=2, size=96)


@pytest.fixture(scope="session")
def small_flows_run(small_nuclei: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch flows U-Net (depth 2, 8 features) on :func:`small_nuclei`: a checkpoint to export and predict with."""
    from deepscope.cli import main

    out = tmp_path_factory.mktemp("small_run") / "flows"
    options = cpu_unet_options(batch_size=8, lr=0.005, depth=2, patch=64, patches_per_epoch=32, val_fraction=0.2)
    assert main(train_args("segment", small_nuclei, out, 2, *options, "--set", "target=flows")) == 0
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process at once, with pytest's own exit status, once a Qt application was made (the napari
    tests): in the whole suite, PySide6 destroying its application at interpreter exit (or when asked to) ends in a
    segmentation fault after every test has passed, which CI would report as a failure. Nothing is left to do by then:
    the report is printed and every fixture torn down."""
    qt = sys.modules.get("PySide6.QtWidgets")
    if qt is not None and qt.QApplication.instance() is not None and EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])
