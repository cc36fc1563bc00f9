"""The input pipeline's fast paths are bit-identical to the code they replace: EvalTransform against
torchvision's own transform over hundreds of random sizes (both of PIL's pass orders, every separable
filter, exact sizes, crops larger than the image), the card, timm, SimCLRv2 and BigBiGAN
preprocessing against the implementations they had before, and decoding against PIL's ``convert``.
The reduced (DCT-scaled) decode is the one approximation, and it is checked to be one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from sslbench.imaging import (
    SEPARABLE,
    EvalTransform,
    _horizontal_first,
    _vertical_first_when_taller,
    load_rgb,
    pass_order,
    rgb,
    to_normalized,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Noise plus a gradient: every coefficient of every filter tap matters, and the values span 0..255.
    gradient = np.linspace(0, 255, width)[None, :, None] * np.linspace(0, 1, height)[:, None, None]
    noise = rng.integers(0, 256, (height, width, 3))
    return Image.fromarray(((gradient + noise) % 256).astype(np.uint8))


def _reference(size, crop, interpolation, mean, std):
    """torchvision's Compose as the plugins built it before EvalTransform."""
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode(interpolation)),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def test_eval_transform_equals_torchvision_bit_for_bit_over_random_sizes():
    rng = np.random.default_rng(0)
    order = pass_order()
    assert order is not None, "the installed Pillow orders its resampling passes by no known rule"
    seen_orders = set()
    for trial in range(400):
        width, height = int(rng.integers(1, 640)), int(rng.integers(1, 640))
        interpolation = SEPARABLE[trial % len(SEPARABLE)]
        if trial % 9 == 0:
            size: int | tuple[int, int] = (int(rng.integers(4, 320)), int(rng.integers(4, 320)))
        else:
            size = int(rng.integers(4, 320))
        short = size if isinstance(size, int) else min(size)
        crop = int(rng.integers(2, short + 24))  # sometimes larger than the resized image: torchvision pads
        mean, std = tuple(rng.random(3)), tuple(rng.random(3) + 0.05)
        ours = EvalTransform.make(size, crop, interpolation, mean, std)
        image = _image(rng, width, height)
        expected = _reference(size if isinstance(size, int) else list(size), crop, interpolation, mean, std)(image)
        got = ours(image)
        assert got.dtype == expected.dtype and got.is_contiguous()
        assert torch.equal(got, expected), (width, height, size, crop, interpolation)
        out_w, out_h = ours.output_size(width, height)
        seen_orders.add(order(width, height, out_w, out_h))
    assert seen_orders == {True, False} or order is _horizontal_first


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "size",
    [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (256, 256), (257, 300), (1024, 768), (90, 1200)],
)
def test_eval_transform_on_imagenet_shapes(size, interpolation):
    image = _image(np.random.default_rng(size[0] * size[1]), *size)
    for resize, crop in ((256, 224), (248, 224), (224, 224), (235, 224), (507, 475)):
        ours = EvalTransform.make(resize, crop, interpolation, MEAN, STD)
        assert torch.equal(ours(image), _reference(resize, crop, interpolation, MEAN, STD)(image))


def test_pass_order_is_the_installed_pillows():
    """PIL resizes in two passes and (Pillow 13) picks their order; the rule found must reproduce it on
    shapes where the two orders differ, and the split resize agrees whichever rule applies."""
    order = pass_order()
    assert order in (_vertical_first_when_taller, _horizontal_first)
    rng = np.random.default_rng(5)
    for width, height, out_w, out_h in (
        (60, 700, 50, 200),
        (700, 60, 200, 50),
        (176, 683, 16, 309),
        (405, 506, 394, 481),
    ):
        image = _image(rng, width, height)
        whole = image.resize((out_w, out_h), Image.Resampling.BICUBIC)
        if order(width, height, out_w, out_h):
            first = image.resize((width, out_h), Image.Resampling.BICUBIC)
        else:
            first = image.resize((out_w, height), Image.Resampling.BICUBIC)
        assert first.resize((out_w, out_h), Image.Resampling.BICUBIC).tobytes() == whole.tobytes()


def test_an_unknown_pass_order_falls_back_to_whole_resizes(monkeypatch):
    import sslbench.imaging as imaging

    monkeypatch.setattr(imaging, "pass_order", lambda: None)
    rng = np.random.default_rng(1)
    ours = EvalTransform.make(256, 224, "bicubic", MEAN, STD)
    for width, height in ((500, 375), (60, 700)):
        image = _image(rng, width, height)
        assert torch.equal(ours(image), _reference(256, 224, "bicubic", MEAN, STD)(image))


def test_to_normalized_is_to_tensor_then_normalize():
    rng = np.random.default_rng(2)
    everything = Image.fromarray(np.arange(256 * 3, dtype=np.uint16).reshape(16, 16, 3).astype(np.uint8))
    for image in (everything, _image(rng, 37, 23)):
        for mean, std in ((MEAN, STD), ((0.5,) * 3, (0.5,) * 3), ((0.0,) * 3, (1.0,) * 3)):
            expected = transforms.Normalize(mean, std)(transforms.ToTensor()(image))
            got = to_normalized(image, *[torch.tensor(v).view(3, 1, 1) for v in (mean, std)])
            assert torch.equal(got, expected)


def test_timm_eval_transforms_are_recognised_and_equal():
    import timm
    import timm.data

    rng = np.random.default_rng(3)
    images = [_image(rng, 500, 375), _image(rng, 375, 500), _image(rng, 211, 640)]
    for name in ("resnet50", "vit_small_patch16_224", "convnext_atto", "efficientnet_b0"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
        ours = EvalTransform.from_torchvision(transform)
        assert ours is not None, name
        for image in images:
            assert torch.equal(ours(image), transform(image)), name
    squash = timm.data.create_transform(input_size=(3, 224, 224), crop_mode="squash", is_training=False)
    ours = EvalTransform.from_torchvision(squash)  # Resize((h, w)) + CenterCrop: computed here too
    assert ours is not None and ours.size == (256, 256)
    assert all(torch.equal(ours(image), squash(image)) for image in images)
    border = timm.data.create_transform(input_size=(3, 224, 224), crop_mode="border", is_training=False)
    assert EvalTransform.from_torchvision(border) is None  # timm's own transform runs


def test_card_preprocessing_is_torchvisions(plugins):
    """The card backbones' preprocess: torchvision's Resize(int) + CenterCrop + ToTensor + Normalize."""
    rng = np.random.default_rng(4)
    for card_id in ("mobilenetv2_100.tv_in1k", "tf_efficientnet_lite0.offline_in1k"):
        entry = plugins.backbones.get(card_id)
        backbone = entry.factory(entry.options.model_validate({"pretrained": False}))
        pre = entry.card.preprocessing
        reference = _reference(pre.resize, pre.crop, pre.interpolation, pre.mean, pre.std)
        for width, height in ((500, 375), (375, 500), (640, 427), (256, 256), (200, 150)):
            image = _image(rng, width, height)
            assert torch.equal(backbone.preprocess(image), reference(image))
            assert torch.equal(backbone.preprocess(np.asarray(image)), reference(image))
        grey = Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8))
        assert torch.equal(backbone.preprocess(grey), reference(grey.convert("RGB")))
        assert backbone.decode_side() == pre.resize


def _simclr_before(image, size):
    """tf_eval_preprocess as it was before the crop moved ahead of the float conversion."""
    from sslbench_plugins.simclrv2 import tf_bicubic_matrix, tf_center_crop_box

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    top, left, crop_h, crop_w = tf_center_crop_box(pixels.shape[0], pixels.shape[1])
    pixels = pixels[top : top + crop_h, left : left + crop_w]
    rows, cols = tf_bicubic_matrix(crop_h, size), tf_bicubic_matrix(crop_w, size)
    tall = (rows @ pixels.reshape(crop_h, -1)).reshape(size, crop_w, 3)
    resized = (tall.transpose(2, 0, 1) @ cols.T).clip(0.0, 1.0)
    return torch.from_numpy(resized.astype(np.float32))


def test_simclr_preprocessing_is_unchanged_bit_for_bit():
    from sslbench_plugins.simclrv2 import tf_eval_preprocess

    rng = np.random.default_rng(6)
    for trial in range(60):
        width, height = int(rng.integers(2, 600)), int(rng.integers(2, 600))
        size = 224 if trial % 3 == 0 else int(rng.integers(8, 260))
        image = _image(rng, width, height)
        assert torch.equal(tf_eval_preprocess(image, size), _simclr_before(image, size)), (width, height, size)
    grey = Image.fromarray(rng.integers(0, 256, (375, 500), dtype=np.uint8))
    assert torch.equal(tf_eval_preprocess(grey, 224), _simclr_before(grey, 224))


def _bigbigan_before(image):
    """BigBiGAN's preprocess as it was: numpy in HWC, then a permuted view."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((256, 256), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def test_bigbigan_preprocessing_is_unchanged_bit_for_bit():
    from sslbench_plugins.bigbigan import center_square_256

    rng = np.random.default_rng(7)
    for _ in range(40):
        image = _image(rng, int(rng.integers(1, 600)), int(rng.integers(1, 600)))
        expected = _bigbigan_before(image)
        assert np.array_equal(center_square_256(image), expected.permute(1, 2, 0).numpy())
    grey = Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8))
    assert np.array_equal(center_square_256(grey), _bigbigan_before(grey).permute(1, 2, 0).numpy())


def test_load_rgb_decodes_as_pil_converts(tmp_path):
    rng = np.random.default_rng(8)
    pixels = np.asarray(_image(rng, 500, 375))
    cases = {
        "rgb.jpg": Image.fromarray(pixels),
        "grey.jpg": Image.fromarray(pixels[:, :, 0]),
        "cmyk.jpg": Image.fromarray(pixels).convert("CMYK"),
        "rgba.png": Image.fromarray(np.dstack([pixels, pixels[:, :, :1]])),
        "palette.png": Image.fromarray(pixels).convert("P"),
        "grey.png": Image.fromarray(pixels[:, :, 1]),
    }
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path, quality=90) if name.endswith(".jpg") else image.save(path)
        with Image.open(path) as opened:
            expected = opened.convert("RGB")
        got = load_rgb(path)
        assert got.mode == "RGB" and got.size == expected.size and got.tobytes() == expected.tobytes(), name
        assert load_rgb(str(path)).tobytes() == expected.tobytes()
    image = load_rgb(tmp_path / "rgb.jpg")
    assert rgb(image) is image  # an RGB image is not copied


def test_reduced_decode_keeps_the_shorter_side_and_is_an_approximation(tmp_path):
    rng = np.random.default_rng(9)
    big, png = tmp_path / "big.jpg", tmp_path / "big.png"
    _image(rng, 1200, 900).save(big, quality=90)
    _image(rng, 1200, 900).save(png)
    assert load_rgb(big).size == (1200, 900)
    # libjpeg's scales 1/2, 1/4, 1/8: the smallest whose both sides stay at least min_side.
    assert load_rgb(big, 256).size == (600, 450)
    assert load_rgb(big, 100).size == (150, 113)
    assert load_rgb(big, 500).size == (1200, 900)
    assert load_rgb(png, 100).size == (1200, 900)  # only JPEG has DCT scaling
    transform = EvalTransform.make(256, 224, "bilinear", MEAN, STD)
    exact, reduced = transform(load_rgb(big)), transform(load_rgb(big, transform.min_side))
    assert exact.shape == reduced.shape == (3, 224, 224)
    assert not torch.equal(exact, reduced)
    assert float((exact - reduced).abs().mean()) < 0.1  # normalised units: an approximation, not a bug
