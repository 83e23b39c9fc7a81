"""Images in, model inputs out: robust loading, the evaluation transform, and class-folder datasets.

Loading turns whatever a user has (EXIF-rotated JPEGs, greyscale, palette and transparent PNGs, CMYK, 16-bit
PNGs, animated GIFs, very large photos) into one 8-bit RGB image, or raises `ImageLoadError` for that file
alone. `Preprocess` is the standard ImageNet evaluation transform, parameterised by a model's `ModelSpec`:
resize the shorter side to floor(input_size / crop_pct) (bicubic for every PoolFormer), centre-crop
input_size x input_size, scale to [0, 1] and normalise with the model's mean/std. It gives the same tensor as
timm's `create_transform(**resolve_data_config(model=...))` (tests/test_data.py checks it on real photos).
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError, PoolformerError
from .zoo import ModelSpec

# Files a directory scan treats as images (an explicitly named file is always tried, whatever its name).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi",
})

# PIL refuses images above 2 * Image.MAX_IMAGE_PIXELS as possible decompression bombs; we keep the same
# ceiling (about 537 MB once decoded to RGB) but apply it ourselves, so the limit is explicit, no warning
# is printed in between, and a huge JPEG can still be decoded at a reduced scale instead of refused.
DEFAULT_MAX_PIXELS = 178_956_970

_PIL_LIMIT_LOCK = threading.Lock()
_WNID = re.compile(r"n\d{8}")


class ImageLoadError(PoolformerError):
    """One image that cannot be used (missing, truncated, not an image, too large). `reason` is the message
    without the path, for listings that show the path in a column of its own."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# --- loading -----------------------------------------------------------------------------------------

def _open_without_pil_bomb_check(path: Path) -> Image.Image:
    """Image.open reads only the header; PIL's bomb check runs there from a module global, so it is lifted
    for this one call (under a lock, restored after) and `load_image` applies `max_pixels` instead."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _fit_within_pixel_limit(img: Image.Image, path: Path, max_pixels: int) -> None:
    """Refuse an image above `max_pixels`, unless it is a JPEG: those decode at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, cheap and without the full-size buffer), the smallest reduction that fits."""
    width, height = img.size
    if width * height <= max_pixels:
        return
    if img.format == "JPEG":
        for scale in (2, 4, 8):
            if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
                img.draft(img.mode, (math.ceil(width / scale), math.ceil(height / scale)))
                return
    raise ImageLoadError(
        path, f"{width}x{height} = {width * height:,} pixels is over the {max_pixels:,}-pixel limit "
        "(decompression-bomb guard)"
    )


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit greyscale (mode I;16*, or I holding 16-bit values) -> 8-bit RGB by scaling 0..65535 to 0..255.
    PIL's own convert("L") clips everything above 255 to white instead."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "I" and values.max(initial=0) <= 255:  # a 32-bit container holding 8-bit values
        scaled = values
    else:
        scaled = values / 257.0
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Mode F (float TIFF): values in [0, 1] are scaled to 0..255, anything else is clipped to 0..255."""
    values = np.asarray(img, dtype=np.float64)
    if values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    grey = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels become white, as a viewer on a white page shows them (PIL's plain convert("RGB")
    would expose whatever colour the transparent pixels happen to store, often black)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha (RGBA, LA, palette with transparency) is composited on white;
    CMYK uses PIL's conversion (which also undoes Adobe's inverted CMYK JPEGs); 16-bit greyscale is scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(img)
    if mode == "F":
        return _float_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        return _composite_on_white(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image.

    EXIF orientation is applied; animated images give their first frame; see `to_rgb` for colour modes.
    Raises ImageLoadError (one line, naming the file) for a missing, truncated, unreadable or too large file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "no such file" if not path.exists() else "not a file")
    try:
        with _open_without_pil_bomb_check(path) as img:
            _fit_within_pixel_limit(img, path, max_pixels)
            img.seek(0)  # animated GIF/PNG/WebP: the first frame
            img.load()  # decode now, inside the try: truncation surfaces here
            return to_rgb(_upright(img))
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (or a format PIL cannot read)") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImageLoadError(path, f"unreadable image ({reason})") from None


def _upright(img: Image.Image) -> Image.Image:
    """A decoded copy detached from the file, rotated/flipped as its EXIF Orientation tag says. Malformed
    EXIF is ignored rather than costing the whole image."""
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF blocks raise all sorts of errors; the pixels are still fine
        return img.copy()
    return upright if upright is not None else img.copy()


# --- the evaluation transform ----------------------------------------------------------------------

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocess:
    """PIL RGB image -> normalised float32 tensor [3, input_size, input_size].

    Picklable, so DataLoader workers can run it. `resize_size` = floor(input_size / crop_pct) is the
    shorter side after resizing: 248 for crop_pct 0.9, 235 for 0.95, 224 for 1.0.
    """

    input_size: int = 224
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> "Preprocess":
        return cls(spec.input_size, spec.crop_pct, spec.interpolation, tuple(spec.mean), tuple(spec.std))

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; choose from: {', '.join(_PIL_FILTERS)}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], not {self.crop_pct}")

    @property
    def resize_size(self) -> int:
        return math.floor(self.input_size / self.crop_pct)

    def resize(self, img: Image.Image) -> Image.Image:
        """Shorter side -> resize_size, aspect ratio kept; the longer side is truncated to an integer (as
        torchvision's Resize does, so crops line up pixel for pixel)."""
        width, height = img.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.resize_size * long / short)
        size = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
        if size == img.size:
            return img
        return img.resize(size, _PIL_FILTERS[self.interpolation])

    def center_crop(self, img: Image.Image) -> Image.Image:
        """The central input_size square; offsets round half to even, like torchvision's CenterCrop."""
        width, height = img.size
        left = int(round((width - self.input_size) / 2.0))
        top = int(round((height - self.input_size) / 2.0))
        return img.crop((left, top, left + self.input_size, top + self.input_size))

    def to_tensor(self, img: Image.Image):
        """uint8 HWC -> float32 CHW in [0, 1], then (x - mean) / std per channel."""
        import torch

        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        x = pixels.to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, img: Image.Image):
        return self.to_tensor(self.center_crop(self.resize(to_rgb(img))))


# --- finding images ----------------------------------------------------------------------------------

def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def images_under(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, in sorted order; hidden files and folders are ignored."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found.extend(Path(root) / f for f in sorted(files) if not _is_hidden(f) and is_image_name(f))
    return found


def images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted (predict on a directory does not recurse)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not _is_hidden(p.name) and is_image_name(p))


# --- class-folder datasets ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: str
    target: int  # index into the model's outputs


@dataclass(frozen=True)
class ClassFolders:
    """A class-folder dataset resolved against a model's outputs.

    root: the folder holding the class folders (DIR, or DIR/val for a full ImageNet tree).
    class_to_index: folder name -> model output index. mapping: how it was decided: "imagenet-wnid",
    "class-map" or "sorted". samples: every image, sorted by folder then path.
    """

    root: str
    class_to_index: dict[str, int]
    mapping: str
    samples: tuple[Sample, ...]


def _class_folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def resolve_dataset_root(path: str | os.PathLike) -> Path:
    """DIR itself, or DIR/val when DIR is an ImageNet tree (train/, val/) rather than the class folders."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"dataset directory not found: {root}")
    if not root.is_dir():
        raise ConfigError(f"not a directory: {root}")
    val = root / "val"
    if val.is_dir() and not any(_WNID.fullmatch(name) for name in _class_folder_names(root)):
        return val
    return root


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """A class map file: JSON {folder: index}, or text with one folder name per line (line number = index,
    timm's format). Raises ConfigError for an unreadable or malformed file."""
    import json

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read class map {path}: {err.strerror if isinstance(err, OSError) else err}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"class map {path} is not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            raise ConfigError(f"class map {path} must be a JSON object of folder name -> integer class index")
        return {str(k): v for k, v in data.items()}
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise ConfigError(f"class map {path} lists a folder name twice")
    return {name: index for index, name in enumerate(names)}


def _abbreviate(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def map_classes(folders: list[str], num_classes: int, class_map: dict[str, int] | None) -> tuple[dict[str, int], str]:
    """Folder name -> model output index, and which rule decided it.

    With a class map: every folder must be in it, with an index below num_classes. Otherwise folders named
    by ImageNet wnids map to their ImageNet-1k index (sorted wnids = index; a subset of classes is fine),
    and any other set of folders maps in sorted order when there are exactly num_classes of them.
    """
    if class_map is not None:
        unmapped = [f for f in folders if f not in class_map]
        if unmapped:
            raise ConfigError(f"class folders missing from the class map: {_abbreviate(unmapped)}")
        bad = sorted({class_map[f] for f in folders if not 0 <= class_map[f] < num_classes})
        if bad:
            raise ConfigError(f"class map indices out of range for a {num_classes}-class model: {bad[:5]}")
        return {f: class_map[f] for f in folders}, "class-map"
    if any(_WNID.fullmatch(f) for f in folders):
        from .labels import imagenet_wnids

        index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ConfigError(f"class folders that are not ImageNet-1k wnids: {_abbreviate(unknown)}; "
                              "pass --class-map FILE to map folders to class indices")
        if num_classes != len(index):
            raise ConfigError(f"ImageNet wnid folders need a {len(index)}-class model, this one has {num_classes} "
                              "classes; pass --class-map FILE")
        return {f: index[f] for f in folders}, "imagenet-wnid"
    if len(folders) == num_classes:
        return {f: i for i, f in enumerate(sorted(folders))}, "sorted"
    raise ConfigError(f"{len(folders)} class folders are not ImageNet wnids and do not match the model's "
                      f"{num_classes} classes; pass --class-map FILE to map folders to class indices")


def class_folders(path: str | os.PathLike, num_classes: int, class_map: dict[str, int] | None = None) -> ClassFolders:
    """Scan a class-folder dataset (ImageNet validation layout or any other) for a `num_classes` model.

    Raises ConfigError for a missing or empty directory, no class folders, unmappable folders, no images.
    """
    root = resolve_dataset_root(path)
    folders = _class_folder_names(root)
    if not folders:
        loose = images_in(root)
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise ConfigError(f"no class folders in {root}{hint}: expected one sub-folder per class, e.g. "
                          f"{root}/n01440764/*.JPEG")
    class_to_index, mapping = map_classes(folders, num_classes, class_map)
    samples = tuple(Sample(str(p), class_to_index[f]) for f in folders for p in images_under(root / f))
    if not samples:
        raise ConfigError(f"no images in the {len(folders)} class folders under {root}")
    return ClassFolders(str(root), class_to_index, mapping, samples)


def spread_subset(items: Sequence, limit: int | None) -> list:
    """`limit` items spread evenly over the sequence (every class of a sorted dataset is represented), in
    order; all of them when limit is None or not smaller."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


class ImageDataset:
    """A map-style dataset over samples for torch's DataLoader: item i is
    (image [3, S, S] float32, target, i, error). An unreadable image gives a zero tensor and its one-line
    error instead of raising, so one bad file never stops a run; the engine drops and reports it."""

    def __init__(self, samples: Sequence[Sample], transform: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torch

        sample = self.samples[i]
        try:
            x = self.transform(load_image(sample.path, self.max_pixels))
            error = ""
        except ImageLoadError as err:
            size = self.transform.input_size
            x, error = torch.zeros(3, size, size), err.reason
        return x, sample.target, i, error


def load_batch(paths: Iterable[str | os.PathLike], transform: Preprocess,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list, list[str | None]]:
    """Load and preprocess images one by one: (tensors, errors); a failed image has tensor None and its error."""
    tensors, errors = [], []
    for path in paths:
        try:
            tensors.append(transform(load_image(path, max_pixels)))
            errors.append(None)
        except ImageLoadError as err:
            tensors.append(None)
            errors.append(err.reason)
    return tensors, errors


def synthetic_images(count: int = 4, size: int = 256, seed: int = 0) -> list[Image.Image]:
    """Photograph-like RGB test images (smooth colour gradients with a few soft-edged shapes), for checks that
    need natural-looking inputs where no photographs are at hand (e.g. `poolformer export` parity)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        base = np.stack([rng.uniform(0.2, 0.8) + rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy
                         for _ in range(3)], axis=-1)
        for _ in range(3):
            cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
            mask = 1 / (1 + np.exp(((yy - cy) ** 2 + (xx - cx) ** 2 - radius**2) * 300))
            base = base * (1 - mask[..., None]) + rng.uniform(0, 1, 3) * mask[..., None]
        noise = rng.normal(0, 0.02, base.shape)
        images.append(Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8)))
    return images
