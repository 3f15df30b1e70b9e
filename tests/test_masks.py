"""Inpainting masks in every mode: alpha counts where present, values are scaled by the mode's range.

One picture drawn in each mode: the top half marked to repaint, the bottom half to keep. Every mode
must give the same 0/1 mask, at the drawn size and resized.
"""

import numpy as np
import PIL.Image
import pytest

from runtime import images

W, H = 16, 16
TOP = np.zeros((H, W), dtype=bool)
TOP[: H // 2] = True


def drawn(mode: str) -> PIL.Image.Image:
    if mode == "L":
        return PIL.Image.fromarray(np.where(TOP, 255, 0).astype(np.uint8), "L")
    if mode == "I;16":
        return PIL.Image.fromarray(np.where(TOP, 65535, 0).astype(np.uint16))  # mode I;16
    if mode == "I;16-dim":  # 16-bit with the mark at 60%: an 8-bit conversion would clip it to white
        return PIL.Image.fromarray(np.where(TOP, 39321, 13107).astype(np.uint16))
    if mode == "I":
        return PIL.Image.fromarray(np.where(TOP, 65535, 0).astype(np.int32), "I")
    if mode == "F":
        return PIL.Image.fromarray(np.where(TOP, 1.0, 0.0).astype(np.float32), "F")
    if mode == "F-dim":  # 0.3 keep, 0.7 repaint: 0..1 floats, not 0..255
        return PIL.Image.fromarray(np.where(TOP, 0.7, 0.3).astype(np.float32), "F")
    if mode == "RGBA-alpha-only":  # black everywhere, drawn in the alpha channel alone
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., 3] = np.where(TOP, 255, 0)
        return PIL.Image.fromarray(rgba, "RGBA")
    if mode == "RGBA-white-brush":  # white where drawn, transparent (white underneath) elsewhere
        rgba = np.full((H, W, 4), 255, np.uint8)
        rgba[..., 3] = np.where(TOP, 255, 0)
        return PIL.Image.fromarray(rgba, "RGBA")
    if mode == "RGBA-opaque":  # fully opaque: the gray level decides, as without alpha
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., :3] = np.where(TOP, 255, 0)[..., None]
        rgba[..., 3] = 255
        return PIL.Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        la = np.zeros((H, W, 2), np.uint8)
        la[..., 1] = np.where(TOP, 255, 0)
        return PIL.Image.fromarray(la, "LA")
    if mode == "P-transparent":
        palette = PIL.Image.fromarray(np.where(TOP, 1, 0).astype(np.uint8), "P")
        palette.putpalette([255, 255, 255, 255, 255, 255])
        palette.info["transparency"] = 0  # index 0 (the bottom) transparent
        return palette
    raise AssertionError(mode)


MODES = [
    "L",
    "I;16",
    "I;16-dim",
    "I",
    "F",
    "F-dim",
    "RGBA-alpha-only",
    "RGBA-white-brush",
    "RGBA-opaque",
    "LA",
    "P-transparent",
]  # P-transparent: mode "P"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(W, H), (W // 2, H // 2)])
def test_every_mode_marks_the_top_half(mode, size):
    picture = drawn(mode)
    assert picture.mode == mode.split("-")[0]
    mask = images.mask_to_tensor(picture, *size)[0, 0].numpy()
    expected = TOP[:: W // size[0], :: H // size[1]] if size != (W, H) else TOP
    assert mask.shape == (size[1], size[0])
    np.testing.assert_array_equal(mask.astype(bool), expected)


def test_fully_transparent_mask_repaints_nothing():
    rgba = np.full((H, W, 4), 255, np.uint8)
    rgba[..., 3] = 0
    assert images.mask_to_tensor(PIL.Image.fromarray(rgba, "RGBA"), W, H).sum() == 0


def test_float_mask_with_nan_is_refused():
    values = np.zeros((H, W), np.float32)
    values[0, 0] = np.nan
    with pytest.raises(ValueError, match="mask holds NaN or inf"):
        images.mask_to_tensor(PIL.Image.fromarray(values, "F"), W, H)
