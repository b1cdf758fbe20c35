"""Detection backbones and torchvision's detectors built from scratch: shapes, losses, detections, overfitting, errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

from deepscope.errors import DeepscopeError
from deepscope.models.detection import build_detector, detector_names, predicts_masks
from deepscope.models.detection.backbones import BACKBONES, CrossStageBlock, build_backbone, group_norm
from deepscope.models.detection.dfl import distribution_focal_loss, expected_distances
from deepscope.models.detection.torchvision_detectors import paired_iou, quality_focal_loss

TORCHVISION_DETECTORS = ("fasterrcnn", "retinanet", "fcos", "maskrcnn")
# 96x128 and 112x96 images stay unresized
SMALL = {"backbone": "tiny", "fpn_channels": 16, "min_size": 96, "max_size": 128}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: their convolutions gain nothing from intra-op threads, and on a busy shared CPU the
    threads' waiting for each other made a 2-second test take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def painted_image(boxes: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grey image with each box filled bright in the colour channel of its label: an easy, known answer."""
    image = torch.full((3, *size), 0.2)
    for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
        image[label - 1, y1:y2, x1:x2] = 0.9
    return image


def two_images() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images of two sizes, the second without objects; both with instance masks filling their boxes."""
    boxes, labels = torch.tensor([[10.0, 20, 50, 60], [60, 30, 90, 80]]), torch.tensor([1, 2])
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
        mask[y1:y2, x1:x2] = 1
    images = [painted_image(boxes, labels, (96, 128)), torch.rand(3, 112, 96)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    empty["masks"] = torch.zeros(0, 112, 96, dtype=torch.uint8)
    return images, [{"boxes": boxes, "labels": labels, "masks": masks}, empty]


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_gives_fpn_maps_at_the_requested_strides(name: str, norm: str) -> None:
    backbone = build_backbone(name, norm=norm, fpn_channels=16, strides=(4, 8, 16, 32), extra_p6p7=True)
    features = backbone(torch.rand(2, 3, 64, 128))
    assert list(features) == ["0", "1", "2", "3", "p6", "p7"]
    assert backbone.strides == (4, 8, 16, 32, 64, 128) and backbone.out_channels == 16
    for feature, stride in zip(features.values(), backbone.strides):
        assert feature.shape == (2, 16, math.ceil(64 / stride), math.ceil(128 / stride))
    norms = {type(m) for m in backbone.modules()} & {nn.GroupNorm, nn.BatchNorm2d}
    assert norms == ({nn.GroupNorm} if norm == "group" else {nn.BatchNorm2d})


def test_backbone_takes_other_channel_counts_and_a_subset_of_strides() -> None:
    backbone = build_backbone("tiny", in_channels=1, strides=(4,))
    features = backbone(torch.rand(1, 1, 32, 48))
    assert list(features) == ["0"] and features["0"].shape == (1, 128, 8, 12)
    for bad in ({"strides": (16, 8)}, {"strides": (2, 4)}, {"strides": ()}):
        with pytest.raises(ValueError, match="strides"):
            build_backbone("tiny", **bad)
    with pytest.raises(ValueError, match="resnet99"):
        build_backbone("resnet99")


def test_csp_trunk_takes_one_channel_and_its_blocks_keep_every_depths_features() -> None:
    backbone = build_backbone("csp", in_channels=1, fpn_channels=8, strides=(8, 16, 32))
    features = backbone(torch.rand(1, 1, 64, 96))
    assert [tuple(f.shape) for f in features.values()] == [(1, 8, 8, 12), (1, 8, 4, 6), (1, 8, 2, 3)]
    block = CrossStageBlock(8, depth=2, norm=group_norm)
    # the fusing 1x1 convolution reads the two halves of the split and each bottleneck's output: (2 + 2) x 4 channels
    assert block.fuse[0].in_channels == 16 and block(torch.rand(1, 8, 5, 5)).shape == (1, 8, 5, 5)


def test_torchvision_resnet_weights_fit_the_trunk() -> None:
    """A user's own torchvision ResNet (same norm) loads under ``body.``; only the classifier is left over."""
    state = torchvision.models.resnet18(norm_layer=group_norm).state_dict()
    result = build_backbone("resnet18", strides=(4, 8, 16, 32)).body.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]


def test_groupnorm_features_do_not_depend_on_the_other_images_in_the_batch() -> None:
    """In training mode BatchNorm normalises with the batch's statistics, so an image's features change with its
    companions; GroupNorm's do not, which is why it suits detection's small batches."""
    torch.manual_seed(0)
    image, other = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 3
    for norm, independent in (("group", True), ("batch", False)):
        backbone = build_backbone("tiny", norm=norm, fpn_channels=16).train()
        alone, together = backbone(image)["0"], backbone(torch.cat([image, other]))["0"][:1]
        assert torch.allclose(alone, together, atol=1e-5) == independent, norm


@pytest.mark.parametrize("name", TORCHVISION_DETECTORS)
def test_detector_gives_losses_in_training_and_detections_in_evaluation(name: str) -> None:
    torch.manual_seed(0)
    images, targets = two_images()
    model = build_detector(name, 2, **SMALL, score_thresh=0.0)
    losses = model.train()(images, targets)
    assert losses and all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
    assert ("loss_mask" in losses) == predicts_masks(name)
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2
    for detection, image in zip(detections, images):
        height, width = image.shape[1:]
        boxes = detection["boxes"]
        assert len(boxes) > 0 and len(boxes) == len(detection["scores"]) == len(detection["labels"])
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
        assert set(detection["labels"].tolist()) <= {1, 2}
        assert ((detection["scores"] >= 0) & (detection["scores"] <= 1)).all()
        if predicts_masks(name):
            assert detection["masks"].shape == (len(boxes), 1, height, width)
        else:
            assert "masks" not in detection


def test_retinanet_overfits_one_image() -> None:
    torch.manual_seed(0)
    boxes, labels = torch.tensor([[5.0, 7, 27, 24], [33, 29, 60, 60], [13, 40, 29, 59]]), torch.tensor([1, 2, 1])
    image = painted_image(boxes, labels, (64, 64))
    model = build_detector(
        "retinanet", 2, backbone="tiny", fpn_channels=16, min_size=64, max_size=64, extra_p6p7=False
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(50):
        loss = sum(model([image], [{"boxes": boxes, "labels": labels}]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 10
    with torch.no_grad():
        found = model.eval()([image])[0]
    confident = found["scores"] > 0.5
    for box, label in zip(boxes, labels):
        same_class = confident & (found["labels"] == label)
        assert same_class.any() and box_iou(box[None], found["boxes"][same_class]).max() > 0.5


def test_max_detections_lifts_the_cap_of_100_and_label_0_never_comes_out() -> None:
    """An untrained RetinaNet scores every anchor 0.01 (its prior), so a zero threshold lets hundreds through."""
    torch.manual_seed(0)
    image = [torch.rand(3, 128, 128)]
    counts = {}
    for cap in (100, 300):
        model = build_detector(
            "retinanet",
            1,
            backbone="tiny",
            fpn_channels=16,
            min_size=128,
            max_size=128,
            score_thresh=0.0,
            max_detections=cap,
        ).eval()
        with torch.no_grad():
            detection = model(image)[0]
        assert (detection["labels"] == 1).all()
        counts[cap] = len(detection["boxes"])
    assert counts[100] <= 100 < counts[300]


def test_groupnorm_detections_do_not_depend_on_the_other_images_in_the_batch() -> None:
    torch.manual_seed(0)
    image, other = torch.rand(3, 96, 128), torch.rand(3, 96, 128)
    model = build_detector("fcos", 1, **SMALL, score_thresh=0.0).eval()
    with torch.no_grad():
        alone, together = model([image])[0], model([image, other])[0]
    assert len(alone["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.allclose(alone[key].float(), together[key].float(), atol=1e-4), key


def test_registry_names_and_errors() -> None:
    assert detector_names() == ["centernet", "detr", "fasterrcnn", "fcos", "maskrcnn", "retinanet"]
    assert [predicts_masks(name) for name in TORCHVISION_DETECTORS] == [False, False, False, True]
    with pytest.raises(DeepscopeError, match="unknown detector 'yolo'; choose one of centernet, detr"):
        build_detector("yolo", 2)
    with pytest.raises(DeepscopeError, match="'fcos' has no argument.*depth.*it takes .*backbone"):
        build_detector("fcos", 2, depth=3)
    for bad, problem in (
        ({"backbone": "resnet99"}, "resnet99"),
        ({"norm": "layer"}, "layer"),
        ({"min_size": 900}, "min_size"),
        ({"strides": [8, 64]}, "strides"),
    ):
        with pytest.raises(DeepscopeError, match=problem):
            build_detector("retinanet", 2, **bad)
    with pytest.raises(DeepscopeError, match="num_classes"):
        build_detector("fasterrcnn", 0)


def fcos_loss_inputs(model: nn.Module) -> tuple:
    """What FCOS hands its head's ``compute_loss`` for two images (one without objects), caught on the way."""
    caught: dict[str, tuple] = {}
    compute = model.head.compute_loss

    def catch(*args: object) -> dict[str, torch.Tensor]:
        caught["args"] = args
        return compute(*args)

    model.head.compute_loss = catch
    images, targets = two_images()
    model.train()(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    del model.head.compute_loss
    return caught["args"]


def test_fcos_losses_with_giou_and_centerness_are_torchvisions() -> None:
    torch.manual_seed(0)
    model = build_detector("fcos", 2, **SMALL)
    args = fcos_loss_inputs(model)
    ours = model.head.compute_loss(*args)
    theirs = torchvision.models.detection.fcos.FCOSHead.compute_loss(model.head, *args)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_iou_scores_and_ciou_change_the_losses_they_name() -> None:
    """Same weights, same assignment: CIoU changes only the box loss (it adds to GIoU's terms), IoU scores only the
    classification and quality losses."""
    losses = {}
    for box_loss, scores in [("giou", "centerness"), ("ciou", "centerness"), ("giou", "iou")]:
        torch.manual_seed(0)
        model = build_detector("fcos", 2, **SMALL, box_loss=box_loss, scores=scores)
        losses[box_loss, scores] = {k: v.item() for k, v in model.head.compute_loss(*fcos_loss_inputs(model)).items()}
    base, ciou, iou = losses["giou", "centerness"], losses["ciou", "centerness"], losses["giou", "iou"]
    assert ciou["bbox_regression"] > base["bbox_regression"]
    assert ciou["classification"] == base["classification"] and ciou["bbox_ctrness"] == base["bbox_ctrness"]
    assert iou["bbox_regression"] == base["bbox_regression"]
    assert iou["classification"] != base["classification"] and iou["bbox_ctrness"] != base["bbox_ctrness"]


def test_paired_iou_and_quality_focal_loss_known_answers() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 2, 2]])
    others = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [3, 3, 4, 4]])
    torch.testing.assert_close(paired_iou(boxes, others), torch.tensor([1.0, 50 / 150, 0.0]))
    targets = torch.tensor([0.3, 0.0, 0.8])
    assert quality_focal_loss(torch.logit(targets.clamp(1e-6, 1 - 1e-6)), targets).item() == pytest.approx(0, abs=1e-9)
    away = quality_focal_loss(torch.logit(torch.tensor([0.6])), torch.tensor([0.3])).item()
    bce = -(0.3 * math.log(0.6) + 0.7 * math.log(0.4))
    assert away == pytest.approx(bce * 0.3**2)


def overfit(
    model: nn.Module, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, steps: int
) -> list[dict[str, float]]:
    """``steps`` AdamW steps of ``model`` on one image; the losses of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        losses = model([image], [{"boxes": boxes, "labels": labels}])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    return history


def test_fcos_with_iou_scores_and_ciou_overfits_one_image_and_scores_estimate_the_iou() -> None:
    torch.manual_seed(0)
    boxes, labels = torch.tensor([[5.0, 7, 27, 24], [33, 29, 60, 60], [13, 40, 29, 59]]), torch.tensor([1, 2, 1])
    image = painted_image(boxes, labels, (64, 64))
    model = build_detector(
        "fcos", 2, backbone="tiny", fpn_channels=16, min_size=64, max_size=64, box_loss="ciou", scores="iou"
    ).train()
    box_losses = [losses["bbox_regression"] for losses in overfit(model, image, boxes, labels, 60)]
    assert box_losses[-1] < 0.7 * box_losses[0]
    with torch.no_grad():
        found = model.eval()([image])[0]
    for box, label in zip(boxes, labels):
        same_class = found["labels"] == label
        overlaps = box_iou(box[None], found["boxes"][same_class])[0]
        best = overlaps.argmax()
        assert overlaps[best] > 0.6
        # the score is sqrt(class probability x predicted IoU), both trained towards the box's IoU
        assert found["scores"][same_class][best].item() == pytest.approx(overlaps[best].item(), abs=0.15)


# two objects of two classes on a 64-pixel image, and the planned CPU network for FCOS at that scale
TWO_BOXES, TWO_LABELS = torch.tensor([[5.0, 7, 37, 34], [33, 29, 60, 60]]), torch.tensor([1, 2])
LIGHT = {"backbone": "csp", "fpn_channels": 16, "head_convs": 2, "extra_p6p7": False, "min_size": 64, "max_size": 64}


def best_overlaps(model: nn.Module, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each box's best IoU among ``model``'s detections of its class on ``image``."""
    with torch.no_grad():
        found = model.eval()([image])[0]
    return [
        box_iou(box[None], found["boxes"][found["labels"] == label]).max().item() for box, label in zip(boxes, labels)
    ]


def test_fcos_with_the_light_head_on_the_csp_trunk_overfits_one_image() -> None:
    """The network the plan gives FCOS on a CPU budget: CSP trunk, pyramid at strides 8-32, two-conv towers."""
    torch.manual_seed(0)
    image = painted_image(TWO_BOXES, TWO_LABELS, (64, 64))
    model = build_detector("fcos", 2, **LIGHT).train()
    towers = [model.head.classification_head.conv, model.head.regression_head.conv]
    assert [sum(isinstance(m, nn.Conv2d) for m in tower) for tower in towers] == [2, 2]
    assert model.anchor_generator.sizes == ((8,), (16,), (32,))  # no P6/P7
    totals = [sum(losses.values()) for losses in overfit(model, image, TWO_BOXES, TWO_LABELS, 80)]
    assert totals[-1] < 0.5 * totals[0]
    assert min(best_overlaps(model, image, TWO_BOXES, TWO_LABELS)) > 0.6
    with pytest.raises(DeepscopeError, match="head_convs"):
        build_detector("fcos", 2, **SMALL, head_convs=0)


def test_distribution_focal_loss_and_expected_distances_known_answers() -> None:
    sharp = torch.full((1, 4, 5), -30.0)
    sharp[0, torch.arange(4), torch.tensor([0, 1, 2, 4])] = 30.0
    torch.testing.assert_close(expected_distances(sharp), torch.tensor([[0.0, 1, 2, 4]]))
    # 3.3 strides is 0.7 of bin 3 and 0.3 of bin 4: those logits give the loss's minimum, the entropy of (0.7, 0.3)
    logits = torch.full((1, 4, 6), -60.0)
    logits[..., 3], logits[..., 4] = math.log(0.7), math.log(0.3)
    distances = torch.full((1, 4), 3.3)
    entropy = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert distribution_focal_loss(logits, distances).item() == pytest.approx(entropy, abs=1e-5)
    torch.testing.assert_close(expected_distances(logits), distances)
    sharper = logits.clone()
    sharper[..., 3], sharper[..., 4] = math.log(0.9), math.log(0.1)
    assert distribution_focal_loss(sharper, distances).item() > entropy + 0.1
    # beyond the last bin the target is (just below) the last bin; two locations add
    far = torch.full((2, 4, 6), -60.0)
    far[..., 4], far[..., 5] = math.log(1e-3), math.log(1 - 1e-3)
    at_edge = -(1e-3 * math.log(1e-3) + (1 - 1e-3) * math.log(1 - 1e-3))
    assert distribution_focal_loss(far, torch.full((2, 4), 9.0)).item() == pytest.approx(2 * at_edge, abs=1e-4)


def test_fcos_with_distributions_adds_their_loss_and_overfits_one_image() -> None:
    """``dfl_bins`` changes the regression layer and adds one loss; the box and classification losses keep their
    form; the detector learns tight boxes on one image."""
    torch.manual_seed(0)
    plain = build_detector("fcos", 2, **SMALL)
    torch.manual_seed(0)
    model = build_detector("fcos", 2, **SMALL, dfl_bins=16)
    assert model.head.regression_head.bbox_reg.out_channels == 64
    losses = model.head.compute_loss(*fcos_loss_inputs(model))
    assert set(losses) == set(plain.head.compute_loss(*fcos_loss_inputs(plain))) | {"bbox_distribution"}
    # untrained, every side is near uniform over 16 bins: the loss is near log(16), times its weight
    assert losses["bbox_distribution"].item() == pytest.approx(0.25 * math.log(16), rel=0.05)
    torch.manual_seed(0)
    image = painted_image(TWO_BOXES, TWO_LABELS, (64, 64))
    model = build_detector("fcos", 2, **LIGHT, dfl_bins=8).train()
    history = overfit(model, image, TWO_BOXES, TWO_LABELS, 80)
    assert history[-1]["bbox_distribution"] < 0.5 * history[0]["bbox_distribution"]
    assert min(best_overlaps(model, image, TWO_BOXES, TWO_LABELS)) > 0.7
    with pytest.raises(DeepscopeError, match="dfl_bins"):
        build_detector("fcos", 2, **SMALL, dfl_bins=1)


def test_fcos_refuses_unknown_box_loss_and_scores() -> None:
    with pytest.raises(DeepscopeError, match="box_loss"):
        build_detector("fcos", 2, **SMALL, box_loss="l1")
    with pytest.raises(DeepscopeError, match="scores"):
        build_detector("fcos", 2, **SMALL, scores="iou-ish")
