"""A checkpoint's network moves to onnxruntime during a long prediction only when that is faster with equal outputs;
short predictions, bf16 and unannounced work stay eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepscope.inference import fastest
from deepscope.inference.fastest import FastestRuntime, announce, runtime_of
from deepscope.inference.tiling import predict_tiled
from deepscope.models import build_unet

pytest.importorskip("onnxruntime", reason="switching to onnxruntime needs it (pip install -e '.[test]')")


def image() -> np.ndarray:
    """A (1, 96, 80) image with structure at several scales."""
    y, x = np.mgrid[:96, :80]
    return (np.sin(x / 5.0) * np.cos(y / 7.0) + (x * y % 13) / 13.0)[None].astype(np.float32)


def predictions(runtime: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return predict_tiled(runtime, image(), 32, 8, out_channels=2, batch_size=2, model_divisor=4)


@pytest.mark.parametrize("faster", [True, False])
def test_a_long_prediction_tries_onnxruntime_and_keeps_it_only_when_faster(monkeypatch, faster):
    torch.manual_seed(0)
    net = build_unet(1, 2, 2, depth=2, features=8).eval()
    expected = predictions(net)
    monkeypatch.setattr(fastest, "SWITCH_SECONDS", 0.0)  # any work left is long enough
    monkeypatch.setattr(fastest, "faster", lambda eager, onnx: faster)
    runtime = FastestRuntime(net, (4, 4), "test")
    got = predictions(runtime)
    assert runtime.choice == ("onnxruntime" if faster else "eager") and runtime.decided
    assert runtime_of(torch.nn.Sequential(runtime)) == {"runtime": runtime.choice}
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(predictions(runtime), expected, atol=1e-5)  # the next image runs on the choice


def test_short_unannounced_or_bf16_work_stays_eager(monkeypatch):
    torch.manual_seed(0)
    net = build_unet(1, 2, 2, depth=2, features=8).eval()
    runtime = FastestRuntime(net, (4, 4), "test")
    predictions(runtime)  # 30 tiles of a small network: far less than SWITCH_SECONDS of eager work
    assert runtime.choice == "eager" and not runtime.decided
    monkeypatch.setattr(fastest, "SWITCH_SECONDS", 0.0)
    with torch.no_grad():
        runtime(torch.zeros(2, 1, 32, 32))  # no work announced: nothing is left to pay for an export
    assert not runtime.decided
    announce(runtime, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        runtime(torch.zeros(2, 1, 32, 32))
    assert not runtime.decided and runtime.choice == "eager"


def test_predict_on_a_checkpoint_says_which_runtime_ran(small_flows_run, small_nuclei, tmp_path, capsys):
    from conftest import last_json
    from deepscope.cli import main

    image = sorted((small_nuclei / "test" / "images").iterdir())[0]
    capsys.readouterr()
    assert main(["predict", str(small_flows_run / "best.pt"), str(image), "--out", str(tmp_path / "p.h5")]) == 0
    assert last_json(capsys)["outputs"][0]["runtime"] == "eager"  # one small image: not worth an export
