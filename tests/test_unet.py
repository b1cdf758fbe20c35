"""U-Net: shapes in 2D and 3D, anisotropic pooling, input checks, a hand-counted size, and overfitting one image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fit_batch
from deepscope.errors import DeepscopeError
from deepscope.models import count_parameters
from deepscope.models.unet import UNet


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
@pytest.mark.parametrize(("dim", "shape", "features"), [(2, (2, 1, 32, 32), 8), (3, (1, 1, 8, 16, 16), 4)])
def test_output_keeps_spatial_shape(dim, shape, features, norm, upsample):
    model = UNet(1, 3, dim=dim, depth=2, features=features, norm=norm, upsample=upsample)
    assert model(torch.randn(shape)).shape == (shape[0], 3, *shape[2:])


def test_group_norm_groups_divide_channels():
    model = UNet(1, 1, depth=1, features=12, norm="group")  # 12 and 24 channels: largest divisors <= 8 are 6 and 8
    assert {(m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {
        (12, 6),
        (24, 8),
    }


def test_anisotropic_pool_leaves_z_alone():
    volume = torch.randn(1, 1, 3, 16, 16)
    model = UNet(1, 2, dim=3, depth=2, features=4, pool=(1, 2, 2))
    assert model.divisor == (1, 4, 4)
    assert model(volume).shape == (1, 2, 3, 16, 16)
    with pytest.raises(DeepscopeError, match=r"\(3, 16, 16\) must be divisible by \(4, 4, 4\)"):
        UNet(1, 2, dim=3, depth=2, features=4)(volume)


def test_wrong_input_explained():
    model = UNet(1, 2, dim=2, depth=2, features=4)
    with pytest.raises(DeepscopeError, match="2D U-Net"):
        model(torch.randn(1, 1, 8, 16, 16))
    with pytest.raises(DeepscopeError, match="1 input channel"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(DeepscopeError, match=r"\(30, 32\) must be divisible by \(4, 4\)"):
        model(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 1}, "dim"),
        ({"depth": 0}, "depth"),
        ({"norm": "layer"}, "normalization"),
        ({"upsample": "nearest"}, "upsampling"),
        ({"final_activation": "tanh"}, "activation"),
        ({"pool": (2, 2, 2)}, "pool"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(1, 1, **kwargs)


def test_parameter_count_by_hand():
    def block(c_in: int, c_out: int) -> int:  # two bias-free 3x3 convs, each with BatchNorm weight and bias
        return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out

    widths = [32, 64, 128, 256, 512]
    encoder = sum(block(c_in, c) for c_in, c in zip([1] + widths, widths[:-1]))
    bottleneck = block(256, 512)
    up = sum(2 * c * c * 2 * 2 + c for c in widths[:-1])  # 2x2 transposed conv from 2c to c, with bias
    decoder = sum(block(2 * c, c) for c in widths[:-1])
    head = 32 * 2 + 2
    assert count_parameters(UNet(1, 2, dim=2, depth=4, features=32)) == encoder + bottleneck + up + decoder + head


def test_final_activations():
    x = torch.randn(2, 1, 16, 16)
    probs = UNet(1, 3, depth=2, features=4, final_activation="softmax")(x)
    assert torch.allclose(probs.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    sig = UNet(1, 3, depth=2, features=4, final_activation="sigmoid")(x)
    assert sig.min() >= 0 and sig.max() <= 1 and not torch.allclose(sig, probs)


def test_overfits_disk_mask():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    radius = ((yy - 13) ** 2 + (xx - 18) ** 2).sqrt()[None, None]
    mask = (radius < 8).float()
    # only the outline: filling the disk needs spatial context, not a threshold
    image = ((radius - 8).abs() < 1).float()
    assert ((image > 0.5).float() == mask).float().mean() < 0.9
    model = UNet(1, 1, depth=2, features=8)
    fit_batch(model, image, mask, F.binary_cross_entropy_with_logits, steps=100, lr=1e-2, optimizer=torch.optim.Adam)
    with torch.no_grad():
        accuracy = ((model(image) > 0).float() == mask).float().mean().item()
    assert accuracy > 0.98
