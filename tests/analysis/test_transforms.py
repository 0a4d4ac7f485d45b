"""The invariance views equal the original's transforms (tools/variance_transforms.py of
OpenGVLab/STM-Evaluation) pixel for pixel. The reference below is written from the original's
formulas; its fixes are marked FIX (see stm_dist/analysis/transforms.py)."""
import numpy as np
import pytest
import torch
from conftest import real_images
from torchvision import transforms
from torchvision.transforms.functional import rotate

from stm_dist.analysis.transforms import InvarianceViews, content_shift, direction, jitter_crop, levels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_MEAN / STD
BICUBIC = transforms.InterpolationMode.BICUBIC


def ref_standard(img, img_size, crop_ratio):
    return transforms.Compose([transforms.Resize(int(img_size / crop_ratio), interpolation=BICUBIC),
                               transforms.CenterCrop(img_size), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])(img)


def ref_jitter(img, img_size, crop_ratio, jitter_strength, mode, original_centre=False):
    """PositionJitterTransform with the mode given (FIX: the original draws np.random.randint(7)
    from the unseeded global stream) and, unless original_centre, the crop centred where
    CenterCrop puts it (FIX: the original uses shape // 2)."""
    image = transforms.ToTensor()(transforms.Resize(int(img_size / crop_ratio), interpolation=BICUBIC)(img))
    H, W = image.shape[-2:]
    h, w = img_size // 2, img_size // 2
    if original_centre:
        center = [H // 2, W // 2]
    else:
        center = [int(round((H - img_size) / 2.0)) + h, int(round((W - img_size) / 2.0)) + w]
    s = jitter_strength
    dy, dx = {0: (s, 0), 1: (0, s), 2: (-s, 0), 3: (0, -s), 4: (s, s), 5: (-s, s), 6: (-s, -s), 7: (s, -s)}[mode]
    center[0], center[1] = center[0] + dy, center[1] + dx
    top, bottom = min(center[0] + h, H), max(center[0] - h, 0)
    right, left = min(center[1] + w, W), max(center[1] - w, 0)
    if not original_centre:
        # FIX: a window wholly outside the image (jitter > image, only below ~128 px) is empty;
        # the original's negative slice end would wrap around instead.
        top, right = max(top, bottom), max(right, left)
    cropped = image[:, bottom:top, left:right]
    ih, iw = cropped.shape[-2:]
    pad = [(img_size - iw) // 2 if img_size > iw else 0, (img_size - iw + 1) // 2 if img_size > iw else 0,
           (img_size - ih) // 2 if img_size > ih else 0, (img_size - ih + 1) // 2 if img_size > ih else 0]
    return transforms.Normalize(MEAN, STD)(torch.nn.functional.pad(cropped, pad))


def ref_rotate(img, img_size, crop_ratio, angle, pre_rotate):
    x = transforms.Resize(int(img_size / crop_ratio), interpolation=BICUBIC)(img)
    if pre_rotate:
        x = rotate(x, angle=angle, interpolation=BICUBIC)
    x = transforms.CenterCrop(img_size)(x)
    if not pre_rotate:
        x = rotate(x, angle=angle, interpolation=BICUBIC)
    return transforms.Normalize(MEAN, STD)(transforms.ToTensor()(x))


def test_levels_are_the_originals():
    assert levels("translation") == list(range(0, 65, 4))
    assert levels("pre_rotation") == levels("post_rotation") == list(range(0, 91, 5))
    assert levels("scale") == [r / 1000 for r in range(200, 2001, 125)]
    with pytest.raises(ValueError, match="unknown invariance type"):
        levels("shear")


@pytest.mark.parametrize("img_size", [32, 48])
def test_every_view_equals_the_original_pixel_for_pixel(img_size):
    checked = 0
    for index, img in enumerate(real_images()):
        for kind in ("translation", "pre_rotation", "post_rotation", "scale"):
            tf = InvarianceViews(kind, img_size, 0.875, seed=3)
            views = tf(img, index)
            assert views.shape == (1 + len(tf.levels), 3, img_size, img_size)
            assert torch.equal(views[0], ref_standard(img, img_size, 0.875))
            for j, level in enumerate(tf.levels, 1):
                if kind == "translation":
                    ref = ref_jitter(img, img_size, 0.875, level, direction(3, index, level))
                elif kind == "scale":
                    ref = ref_standard(img, img_size, level)
                else:
                    ref = ref_rotate(img, img_size, 0.875, level, kind == "pre_rotation")
                assert torch.equal(views[j], ref), (kind, level, index)
                checked += 1
    assert checked == 3 * (17 + 19 + 19 + 15)


def test_jitter_zero_is_the_standard_view_where_the_original_is_a_pixel_off():
    from PIL import Image

    # 32 px from int(32 / 0.875) = 36: a 63 x 36 image resizes to 63 wide; 63 - 32 = 31 is odd
    # with 31 // 2 = 15 odd, where CenterCrop's round() and the original's shape // 2 disagree.
    img = real_images()[0].resize((63, 36), Image.BICUBIC)
    ours = InvarianceViews("translation", 32, 0.875)(img, 0)
    assert torch.equal(ours[1], ours[0])  # level 0 == standard view
    original = ref_jitter(img, 32, 0.875, 0, 0, original_centre=True)
    assert not torch.equal(original, ours[0])
    assert torch.equal(original[:, :, 1:], ours[0][:, :, :-1])  # one pixel shifted
    # where the two centres agree (even offsets), the original's own formula gives our views
    for index, img in enumerate(real_images()[1:], 1):
        for level in (0, 8, 20):
            mode = direction(0, index, level)
            ref = ref_jitter(img, 32, 0.875, level, mode, original_centre=True)
            assert torch.equal(InvarianceViews("translation", 32, 0.875)(img, index)[1 + level // 4], ref)


def test_translation_at_224_px_is_the_originals_own_formula():
    """At the size the levels were made for, no window leaves the image: the original's code,
    verbatim but for the drawn mode, gives our views wherever its centre agrees with CenterCrop's
    (this 256 x 384 resize has even offsets)."""
    from PIL import Image

    img = real_images()[0].resize((300, 200), Image.BICUBIC)
    views = InvarianceViews("translation", 224, 0.875, seed=5)(img, 7)
    for j, level in enumerate(levels("translation"), 1):
        assert torch.equal(views[j], ref_jitter(img, 224, 0.875, level, direction(5, 7, level), original_centre=True))


def test_directions_are_seeded_per_image_and_cover_all_eight():
    drawn = [direction(0, i, 8) for i in range(400)]
    assert drawn == [direction(0, i, 8) for i in range(400)]  # deterministic
    assert set(drawn) == set(range(8))                        # the 8th direction too
    counts = np.bincount(drawn, minlength=8)
    assert counts.min() > 25
    assert drawn != [direction(1, i, 8) for i in range(400)]  # the seed matters


@pytest.mark.parametrize("img_size,resize_to", [(224, 256), (32, 36), (33, 37)])
def test_content_shift_is_what_the_jitter_view_shows(img_size, resize_to):
    """The level is the crop window's offset; past the crop margin the window is cut at the
    border and re-centred by the padding, so the content moves less: a 64 px offset at 224 px
    (256 px side, 16 px margin) moves it 40 px. content_shift is measured here on a marker."""
    if img_size == 224:
        assert [content_shift(o, 224, 256) for o in (0, 8, 16, 20, 64)] == [0, 8, 16, 18, 40]
    image = torch.zeros(1, resize_to, resize_to)
    top = int(round((resize_to - img_size) / 2.0))
    for offset in levels("translation"):
        shift = content_shift(offset, img_size, resize_to)
        if shift is None:  # the window left the image: nothing of it is shown
            assert offset >= resize_to - top
            continue
        for mode, (dy, dx) in ((0, (1, 0)), (1, (0, 1))):  # down, right
            # a marker inside the window at this offset, near its centre
            y = min(max(top + offset * dy + img_size // 2, 0), resize_to - 1)
            x = min(max(top + offset * dx + img_size // 2, 0), resize_to - 1)
            marked = image.clone()
            marked[0, y, x] = 1.0
            view = jitter_crop(marked, img_size, offset, mode)
            (vy,), (vx,) = torch.nonzero(view[0], as_tuple=True)
            standard = (y - top, x - top)  # where the standard crop shows it
            assert (standard[0] - int(vy), standard[1] - int(vx)) == (shift * dy, shift * dx), (offset, mode)
