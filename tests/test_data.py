"""Image loading and preprocessing: timm's eval transform as the oracle on real photographs, and generated files
for every awkward kind of image a user may have."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from poolformer.data import (ImageLoadError, Preprocess, class_folders, load_batch, load_image, map_classes,
                             read_class_map, resolve_dataset_root, spread_subset)
from poolformer.errors import ConfigError
from poolformer.labels import class_names, imagenet_names, imagenet_wnids, read_labels_file
from poolformer.zoo import get_spec

from .conftest import marked_slow

skdata = pytest.importorskip("skimage.data")


# --- preprocessing = timm's transform ------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_transforms():
    """timm's eval transform, resolved from timm's own model configs (crop_pct 0.9, 0.95 and 1.0)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    names = ("poolformer_s12", "poolformer_m36", "poolformerv2_s12")
    return {n: create_transform(**resolve_data_config(model=timm.create_model(n, pretrained=False))) for n in names}


def _photos() -> dict[str, np.ndarray]:
    astronaut = skdata.astronaut()
    return {
        "astronaut": astronaut,  # 512x512
        "chelsea_portrait": np.ascontiguousarray(skdata.chelsea().transpose(1, 0, 2)),  # 451x300, tall
        "coffee": skdata.coffee(),  # 400x600, wide
        "rocket": skdata.rocket(),  # 427x640
        "camera_grey": skdata.camera(),  # greyscale
        "odd_crop": astronaut[3:304, 5:462],  # 301x457: odd sizes exercise crop rounding
        "small": skdata.coffee()[100:180, 200:297],  # 80x97: upscaled
    }


@pytest.mark.parametrize("model", marked_slow(["poolformer_s12", "poolformer_m36", "poolformerv2_s12"],
                                               "poolformer_m36"))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_preprocess_equals_timm_on_real_photos(tmp_path, timm_transforms, model, suffix):
    ours = Preprocess.for_spec(get_spec(model))
    for name, pixels in _photos().items():
        path = tmp_path / f"{name}{suffix}"
        Image.fromarray(pixels).save(path)
        expected = timm_transforms[model](Image.open(path).convert("RGB"))
        got = ours(load_image(path))
        assert got.shape == expected.shape == (3, 224, 224), name
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=0, atol=1e-5), (name, (got - expected).abs().max().item())


def test_resize_sizes_follow_crop_pct():
    assert [Preprocess(crop_pct=c).resize_size for c in (0.9, 0.95, 1.0)] == [248, 235, 224]
    resized = Preprocess(crop_pct=0.9).resize(Image.new("RGB", (600, 400)))
    assert resized.size == (372, 248)  # shorter side 248, longer int(248 * 600 / 400)


def test_preprocess_rejects_unknown_interpolation():
    with pytest.raises(ConfigError):
        Preprocess(interpolation="sinc")


# --- robust loading ------------------------------------------------------------------------------------

def _pattern(height: int = 12, width: int = 20) -> np.ndarray:
    """An RGB image with no symmetry, so any rotation or flip shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 12, y * 20, (x * y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("orientation, stored", [
    (3, lambda a: a[::-1, ::-1]),  # rotated 180
    (6, lambda a: np.rot90(a, 1)),  # viewer rotates 90 clockwise to display
    (8, lambda a: np.rot90(a, -1)),  # viewer rotates 90 counter-clockwise
    (2, lambda a: a[:, ::-1]),  # mirrored
])
def test_exif_orientation_is_applied(tmp_path, orientation, stored):
    upright = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    Image.fromarray(np.ascontiguousarray(stored(upright))).save(path, exif=exif)
    assert np.array_equal(np.asarray(load_image(path)), upright)


def test_exif_orientation_on_jpeg(tmp_path):
    upright = np.repeat(np.repeat(_pattern(6, 10), 8, 0), 8, 1)  # blocky, so JPEG keeps it recognisable
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path, exif=exif, quality=95)
    got = np.asarray(load_image(path)).astype(int)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 4


def test_greyscale_and_bilevel_become_rgb(tmp_path):
    grey = _pattern()[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "grey.png")), np.stack([grey] * 3, -1))
    Image.fromarray(grey > 100).save(tmp_path / "bilevel.png")
    expected = np.where(grey > 100, 255, 0).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(tmp_path / "bilevel.png")), np.stack([expected] * 3, -1))


def test_palette_image_uses_its_palette(tmp_path):
    indices = (np.arange(60).reshape(6, 10) % 4).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    img = Image.fromarray(indices, mode="P")
    img.putpalette(palette + [0] * (768 - len(palette)))
    img.save(tmp_path / "palette.png")
    colours = np.array(palette, dtype=np.uint8).reshape(4, 3)
    assert np.array_equal(np.asarray(load_image(tmp_path / "palette.png")), colours[indices])


def test_transparency_is_composited_on_white(tmp_path):
    rgb = _pattern()
    alpha = np.tile(np.array([0, 64, 128, 255], dtype=np.uint8), 5)[None, :].repeat(12, 0)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255 * (1 - a)
    got = np.asarray(load_image(tmp_path / "rgba.png")).astype(float)
    assert np.abs(got - expected).max() <= 1.0
    assert (got[alpha == 0] == 255).all()  # fully transparent: white, whatever colour was stored

    grey = rgb[..., 1]
    Image.fromarray(np.dstack([grey, alpha]), mode="LA").save(tmp_path / "la.png")
    got = np.asarray(load_image(tmp_path / "la.png")).astype(float)
    assert np.abs(got - (grey[..., None] * a + 255 * (1 - a))).max() <= 1.0


def test_palette_with_transparent_index_is_composited_on_white(tmp_path):
    indices = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.save(tmp_path / "transparent.gif", transparency=0)
    got = np.asarray(load_image(tmp_path / "transparent.gif"))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [200, 10, 10]


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk_converts_to_rgb(tmp_path, suffix):
    # pure inks: cyan+magenta+yellow combinations with no black give the primaries, K=255 gives black
    inks = {(0, 255, 255, 0): (255, 0, 0), (255, 0, 255, 0): (0, 255, 0), (255, 255, 0, 0): (0, 0, 255),
            (0, 0, 0, 255): (0, 0, 0), (0, 0, 0, 0): (255, 255, 255)}
    for cmyk, rgb in inks.items():
        path = tmp_path / f"cmyk{suffix}"
        Image.new("CMYK", (16, 16), cmyk).save(path, **({"quality": 100} if suffix == ".jpg" else {}))
        assert Image.open(path).mode == "CMYK"
        got = np.asarray(load_image(path)).astype(int)
        assert np.abs(got - np.array(rgb)).max() <= 3, (cmyk, got[0, 0])


def _write_png16(path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): greyscale [H, W] or RGB [H, W, 3]."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    levels = (np.arange(12 * 20).reshape(12, 20) % 256).astype(np.uint16)
    _write_png16(tmp_path / "grey16.png", levels * 257)  # 16-bit value v*257 is 8-bit level v
    got = np.asarray(load_image(tmp_path / "grey16.png"))
    assert np.array_equal(got, np.stack([levels.astype(np.uint8)] * 3, -1))

    rgb16 = np.stack([levels * 257, (255 - levels) * 257, levels * 128], -1).astype(np.uint16)
    _write_png16(tmp_path / "rgb16.png", rgb16)
    got = np.asarray(load_image(tmp_path / "rgb16.png")).astype(float)
    assert np.abs(got - rgb16 / 257.0).max() <= 1.0


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as check:
        assert check.n_frames == 3
    got = np.asarray(load_image(tmp_path / "anim.gif"))
    assert got.shape == (8, 10, 3) and (got == [255, 0, 0]).all()


def test_large_png_over_pixel_limit_is_an_error(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=10_000)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.fromarray(np.repeat(np.repeat(_pattern(), 32, 0), 20, 1)).save(tmp_path / "big.jpg")  # 400x384
    img = load_image(tmp_path / "big.jpg", max_pixels=50_000)
    assert img.size == (200, 192)  # 1/2 scale is the smallest reduction under 50,000 pixels
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_image(tmp_path / "big.jpg", max_pixels=1_000)  # even 1/8 (50x48) is too many


def test_pil_global_bomb_limit_is_replaced_by_ours(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would raise DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "img.png").size == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


def _jpeg_bytes() -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("truncated.jpg", _jpeg_bytes()[:4000], "truncated"),
    ("truncated.png", None, "unreadable"),
    ("notes.jpg", b"this is not an image\n", "not an image"),
    ("empty.png", b"", "not an image"),
])
def test_broken_files_are_errors_for_that_file_only(tmp_path, name, content, reason):
    if content is None:
        Image.fromarray(_pattern(64, 64)).save(tmp_path / "full.png")
        content = (tmp_path / "full.png").read_bytes()[:-40]
    (tmp_path / name).write_bytes(content)
    Image.fromarray(_pattern()).save(tmp_path / "good.png")
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(tmp_path / name)
    assert "\n" not in str(err.value) and name in str(err.value)
    tensors, errors = load_batch([tmp_path / "good.png", tmp_path / name, tmp_path / "missing.png"], Preprocess())
    assert tensors[0].shape == (3, 224, 224) and errors[0] is None
    assert tensors[1] is None and reason in errors[1]
    assert tensors[2] is None and errors[2] == "no such file"


# --- labels and class folders --------------------------------------------------------------------------

def test_imagenet_labels_come_from_timm():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids, names = imagenet_wnids(), imagenet_names()
    assert len(wnids) == len(names) == 1000 and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and names[0] == "tench, Tinca tinca"
    assert names[281] == info.index_to_description(281)
    assert class_names(10) == [str(i) for i in range(10)]


def test_labels_file_must_match_class_count(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    assert read_labels_file(tmp_path / "labels.txt", 2) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="2 names but the model has 3"):
        read_labels_file(tmp_path / "labels.txt", 3)


def test_map_classes_rules():
    wnids = imagenet_wnids()
    by_wnid, how = map_classes([wnids[5], wnids[999]], 1000, None)
    assert by_wnid == {wnids[5]: 5, wnids[999]: 999} and how == "imagenet-wnid"
    assert map_classes(["b", "a", "c"], 3, None)[0] == {"b": 1, "a": 0, "c": 2}
    assert map_classes(["x", "y"], 1000, {"x": 7, "y": 3, "unused": 1}) == ({"x": 7, "y": 3}, "class-map")
    with pytest.raises(ConfigError, match="not ImageNet-1k wnids: n99999999"):
        map_classes([wnids[0], "n99999999"], 1000, None)
    with pytest.raises(ConfigError, match="--class-map"):
        map_classes(["a", "b"], 1000, None)
    with pytest.raises(ConfigError, match="missing from the class map: y"):
        map_classes(["x", "y"], 1000, {"x": 1})
    with pytest.raises(ConfigError, match="out of range"):
        map_classes(["x"], 10, {"x": 10})


def test_read_class_map_formats(tmp_path):
    (tmp_path / "map.txt").write_text("dogs\ncats\n")
    assert read_class_map(tmp_path / "map.txt") == {"dogs": 0, "cats": 1}
    (tmp_path / "map.json").write_text('{"dogs": 207, "cats": 281}')
    assert read_class_map(tmp_path / "map.json") == {"dogs": 207, "cats": 281}
    (tmp_path / "bad.json").write_text('{"dogs": "x"}')
    with pytest.raises(ConfigError):
        read_class_map(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_class_map(tmp_path / "missing.txt")


def test_class_folders_scan_and_val_subfolder(tmp_path):
    wnids = imagenet_wnids()
    for wnid, count in ((wnids[3], 2), (wnids[1], 1)):
        (tmp_path / "val" / wnid / "sub").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / "val" / wnid / f"{i}.JPEG")
    (tmp_path / "val" / wnids[3] / "sub" / "deep.png").write_bytes(b"")  # recursive, kept (fails at load)
    (tmp_path / "val" / wnids[3] / ".hidden.png").write_bytes(b"")  # hidden: ignored
    (tmp_path / "val" / wnids[3] / "readme.txt").write_text("not an image name")  # ignored
    (tmp_path / "train").mkdir()
    assert resolve_dataset_root(tmp_path) == tmp_path / "val"
    ds = class_folders(tmp_path, 1000)
    assert ds.mapping == "imagenet-wnid" and ds.root == str(tmp_path / "val")
    assert [(s.path.split("val/")[1], s.target) for s in ds.samples] == [
        (f"{wnids[1]}/0.JPEG", 1), (f"{wnids[3]}/0.JPEG", 3), (f"{wnids[3]}/1.JPEG", 3),
        (f"{wnids[3]}/sub/deep.png", 3)]


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "not found"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root.mkdir(), Image.new("RGB", (4, 4)).save(root / "loose.png")), "1 images lie directly"),
    (lambda root: (root / "a").mkdir(parents=True), "no images"),
])
def test_class_folders_bad_input(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(ConfigError, match=message):
        class_folders(root, 1)


def test_spread_subset_covers_the_whole_range():
    assert spread_subset(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread_subset(list(range(3)), 5) == [0, 1, 2]
    assert spread_subset(list(range(3)), None) == [0, 1, 2]
