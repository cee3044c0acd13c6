"""Few-shot image classification from the folders users already have: Omniglot, miniImageNet,
tieredImageNet, CIFAR-FS and FC100.

Layouts read (nothing is downloaded):

* Omniglot, as distributed: ``ROOT/images_background/ALPHABET/CHARACTER/*.png`` and
  ``ROOT/images_evaluation/ALPHABET/CHARACTER/*.png`` (either or both). Every character is a class.
  As in the MAML paper, 1200 characters (a fixed shuffle of all of them, seed 1) are meta-training
  classes and the rest are test classes, and each class's 90°, 180° and 270° rotations are extra
  classes of the same split.
* miniImageNet style: ``ROOT/SPLIT/CLASS/*.jpg`` (SPLIT in train/val/test), or ``ROOT/images/*.jpg``
  with ``ROOT/SPLIT.csv`` files of ``filename,label`` rows (the Ravi & Larochelle split files).
* tieredImageNet (Ren et al. 2018): the same ``ROOT/SPLIT/CLASS/*`` layout (351 / 97 / 160 classes
  in the standard split, grouped by ImageNet's high-level categories), 84x84 RGB.
* CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): CIFAR-100's 100 classes as
  folders of images, ``ROOT/CLASS/*.png`` or ``ROOT/data/CLASS/*.png`` (class folders named by
  CIFAR-100's fine labels: ``apple``, ``aquarium_fish``, ...), split by the standard class lists
  built in here: CIFAR-FS 64 / 16 / 20 random classes; FC100 by superclass, 12 / 4 / 4 superclasses
  (60 / 20 / 20 classes), so no test class shares a superclass with a training one. Bertinetto's
  own split files (``ROOT/splits/bertinetto/SPLIT.txt``, one class per line) are used when present,
  and a tree already split (``ROOT/SPLIT/CLASS/*``) is read as it is. 32x32 RGB.

Images are decoded once (Pillow, the optional ``jmaml[images]`` extra), resized (28×28 grey for
Omniglot, 84×84 RGB for the ImageNet subsets, 32x32 RGB for the CIFAR ones) and cached per source
split as a compressed ``.npz`` keyed by the files' names and contents and the decoding settings, so
a changed folder is re-read and an unchanged one is not. A split becomes one array ``(num_classes,
images_per_class, H, W, C)`` of uint8 that lives on the device; ``sample_episode`` /
``sample_tasks`` draw N-way K-shot episodes from it as pure ``jax.random`` functions inside the
jitted training step.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.core._checks import check_positive_int
from jmaml.core.protocols import TaskDistribution
from jmaml.core.types import Batch, PRNGKey, Task

OMNIGLOT_SPLITS = ("images_background", "images_evaluation")
MINIIMAGENET_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
CACHE_FORMAT = "jmaml-images-v1"


class ImageSplit(NamedTuple):
    """One split of a dataset: ``images`` (classes, per_class, H, W, C) uint8 and the class names."""

    images: np.ndarray
    classes: tuple[str, ...]
    fingerprint: str = ""  # a hash of the files' names and bytes and the decoding settings


# ---- reading folders --------------------------------------------------------------------------

def _image_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path} does not exist or is not a folder")


def omniglot_classes(root: str, split_dir: str) -> dict[str, list[str]]:
    """``{"ALPHABET/CHARACTER": [image paths]}`` for one of Omniglot's folders."""
    base = os.path.join(root, split_dir)
    _check_dir(base, "Omniglot folder")
    out = {}
    for alphabet in sorted(os.listdir(base)):
        a_dir = os.path.join(base, alphabet)
        if not os.path.isdir(a_dir):
            continue
        for character in sorted(os.listdir(a_dir)):
            c_dir = os.path.join(a_dir, character)
            if os.path.isdir(c_dir):
                out[f"{alphabet}/{character}"] = _image_files(c_dir)
    empty = [name for name, files in out.items() if not files]
    if not out:
        raise ValueError(f"{base} holds no ALPHABET/CHARACTER folders of images (Omniglot's layout)")
    if empty:
        raise ValueError(f"Omniglot class {empty[0]} in {base} has no images")
    return out


def folder_classes(root: str, split: str) -> dict[str, list[str]]:
    """``{class: [image paths]}`` for ``ROOT/SPLIT/CLASS/*`` or ``ROOT/SPLIT.csv`` + ``ROOT/images``."""
    _check_dir(root, "data dir")
    split_dir, split_csv = os.path.join(root, split), os.path.join(root, f"{split}.csv")
    out: dict[str, list[str]] = {}
    if os.path.isdir(split_dir):
        for name in sorted(os.listdir(split_dir)):
            c_dir = os.path.join(split_dir, name)
            if os.path.isdir(c_dir):
                out[name] = _image_files(c_dir)
        where = split_dir
    elif os.path.isfile(split_csv):
        images_dir = os.path.join(root, "images")
        _check_dir(images_dir, "image folder")
        with open(split_csv, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if not row or row[0] == "filename":
                    continue
                if len(row) < 2:
                    raise ValueError(f"{split_csv}: expected rows 'filename,label', got {row!r}")
                out.setdefault(row[1], []).append(os.path.join(images_dir, row[0]))
        where = split_csv
    else:
        raise ValueError(f"no split {split!r} in {root}: expected a folder {split_dir} of class folders or a "
                         f"file {split_csv}")
    if not out:
        raise ValueError(f"{where} lists no classes")
    empty = [name for name, files in out.items() if not files]
    if empty:
        raise ValueError(f"class {empty[0]} in {where} has no images")
    return out


# ---- decoding and the cache -------------------------------------------------------------------

def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("reading images needs Pillow: pip install 'jmaml[images]'") from None
    return Image, UnidentifiedImageError


def _memory_bytes() -> int:
    """This machine's physical memory (a generous 1 TiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 2**40


MAX_PIXELS = 64 * 2**20  # far beyond any few-shot image; a bigger header is refused before decoding


def decode(path: str, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as uint8 ``(size, size, channels)`` and its original (width, height)."""
    image_mod, unidentified = _pillow()
    try:
        with warnings.catch_warnings(), image_mod.open(path) as im:
            warnings.simplefilter("error", image_mod.DecompressionBombWarning)
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ValueError(f"{im.size[0]}x{im.size[1]} pixels, more than the {MAX_PIXELS:,} jmaml decodes "
                                 "(a decompression bomb?)")
            im.load()
            original = im.size
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), image_mod.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (OSError, unidentified, ValueError, image_mod.DecompressionBombError,
            image_mod.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return arr.reshape(size, size, channels), original


def _fingerprint(classes: dict[str, list[str]], size: int, channels: int) -> str:
    """A hash of every file's name and content (BLAKE2b over the bytes: an image rewritten with the same size
    and time still changes it) and the decoding settings. Names are hashed as bytes, so file names that
    are not valid UTF-8 work."""
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{channels}".encode())
    for name in sorted(classes):
        h.update(os.fsencode(name))
        for path in classes[name]:
            h.update(b"|" + os.fsencode(os.path.basename(path)) + b"|")
            try:
                with open(path, "rb") as f:
                    h.update(hashlib.file_digest(f, "blake2b").digest())
            except OSError:
                h.update(b"unreadable")  # decode() names the file
    return h.hexdigest()


def load_split(classes: dict[str, list[str]], *, size: int, channels: int, cache_path: str | None = None,
               min_per_class: int = 1) -> ImageSplit:
    """Decodes (or reads from the cache) every class's images into one uint8 array.

    Every class keeps the first ``n`` of its images (sorted by name), ``n`` the smallest class's
    count. All images of a split must share one original size (Omniglot's are 105×105, the usual
    miniImageNet files 84×84); another size is reported with its path.

    Raises:
      ValueError: an unreadable image, a wrongly sized one, or a class with fewer than
        ``min_per_class`` images (named).
    """
    size = check_positive_int(size, "image_size")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    small = {name: len(files) for name, files in classes.items() if len(files) < min_per_class}
    if small:
        name = min(small, key=lambda n: small[n])
        raise ValueError(f"class {name} has {small[name]} images, fewer than the {min_per_class} an episode "
                         f"needs (shots + query per class)")
    key = _fingerprint(classes, size, channels)
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path, "rb") as f, np.load(f, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return ImageSplit(np.array(z["images"]), tuple(json.loads(str(z["classes"]))), key)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            print(f"jmaml: rebuilding the unreadable image cache {cache_path} ({type(e).__name__})", file=sys.stderr)
    names = sorted(classes)
    per_class = min(len(classes[n]) for n in names)
    need = len(names) * per_class * size * size * channels
    if need > _memory_bytes() // 2:
        raise ValueError(f"image_size {size}: {len(names)} classes x {per_class} images of {size}x{size}x{channels} "
                         f"take {need / 2**30:.1f} GiB, more than half this machine's memory "
                         f"({_memory_bytes() / 2**30:.1f} GiB); pick a smaller image_size")
    if names and max(len(classes[n]) for n in names) > per_class:
        short = min(names, key=lambda n: len(classes[n]))
        cut = sum(len(classes[n]) - per_class for n in names)
        print(f"jmaml: every class keeps {per_class} images, the count of its smallest class ({short}); "
              f"{cut} images of the larger classes are left out", file=sys.stderr)
    out = np.empty((len(names), per_class, size, size, channels), np.uint8)
    first_size, first_path = None, None
    for i, name in enumerate(names):
        for j, path in enumerate(classes[name][:per_class]):
            out[i, j], original = decode(path, size, channels)
            if first_size is None:
                first_size, first_path = original, path
            elif original != first_size:
                raise ValueError(f"image {path} is {original[0]}x{original[1]} but {first_path} is "
                                 f"{first_size[0]}x{first_size[1]}: the images of a split must share one size")
    if cache_path:
        tmp = f"{cache_path}.tmp-{os.getpid()}.npz"
        try:
            os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
            np.savez_compressed(tmp, images=out, classes=np.asarray(json.dumps(names)), key=np.asarray(key))
            os.replace(tmp, cache_path)
        except OSError as e:  # a read-only dataset: train on, uncached, and say where a cache could go
            print(f"jmaml: cannot write the image cache {cache_path} ({e.strerror or e}); continuing without it "
                  "(--cache-dir puts it elsewhere)", file=sys.stderr)
            if os.path.exists(tmp):
                os.remove(tmp)
    return ImageSplit(out, tuple(names), key)


def with_rotations(split: ImageSplit) -> ImageSplit:
    """Each class's 90°, 180° and 270° rotations as three more classes (Omniglot, as in the paper)."""
    rotated = [np.rot90(split.images, r, axes=(2, 3)) for r in range(4)]
    names = tuple(f"{n}@rot{90 * r}" for r in range(4) for n in split.classes)
    return ImageSplit(np.ascontiguousarray(np.concatenate(rotated)), names, split.fingerprint)


def _default_cache(data_dir: str) -> str:
    return os.path.join(data_dir, ".jmaml_cache")


def load_omniglot(data_dir: str, *, image_size: int = 28, num_train_classes: int = 1200, rotations: bool = True,
                  cache_dir: str | None = None, min_per_class: int = 1) -> dict[str, ImageSplit]:
    """Omniglot's meta-training and test classes: ``{"train": ImageSplit, "test": ImageSplit}``.

    The characters of ``images_background`` and ``images_evaluation`` (whichever exist) are pooled,
    shuffled with a fixed seed (1) and split ``num_train_classes`` / the rest, then rotated.
    """
    _check_dir(data_dir, "data dir")
    present = [s for s in OMNIGLOT_SPLITS if os.path.isdir(os.path.join(data_dir, s))]
    if not present:
        raise ValueError(f"{data_dir} holds neither {OMNIGLOT_SPLITS[0]} nor {OMNIGLOT_SPLITS[1]} (Omniglot's "
                         "layout: ROOT/images_background/ALPHABET/CHARACTER/*.png)")
    cache_dir = cache_dir or _default_cache(data_dir)
    parts = [load_split(omniglot_classes(data_dir, s), size=image_size, channels=1, min_per_class=min_per_class,
                        cache_path=os.path.join(cache_dir, f"omniglot-{s}-{image_size}.npz")) for s in present]
    per_class = min(p.images.shape[1] for p in parts)
    images = np.concatenate([p.images[:, :per_class] for p in parts])
    fingerprint = hashlib.sha256("|".join(p.fingerprint for p in parts).encode()).hexdigest()
    names = tuple(f"{s}/{n}" for s, p in zip(present, parts) for n in p.classes)
    check_positive_int(num_train_classes, "num_train_classes")
    if num_train_classes >= len(names):
        raise ValueError(f"num_train_classes = {num_train_classes} leaves no test classes: {data_dir} holds "
                         f"{len(names)} characters")
    order = np.random.default_rng(1).permutation(len(names))
    out = {}
    for split, idx in (("train", order[:num_train_classes]), ("test", order[num_train_classes:])):
        idx = np.sort(idx)
        part = ImageSplit(images[idx], tuple(names[i] for i in idx), fingerprint)
        out[split] = with_rotations(part) if rotations else part
    return out


def _check_disjoint(out: dict[str, ImageSplit]) -> dict[str, ImageSplit]:
    for a in out:
        for b in out:
            shared = sorted(set(out[a].classes) & set(out[b].classes)) if a < b else []
            if shared:
                raise ValueError(f"splits {a} and {b} share classes ({', '.join(shared[:3])}): they must be disjoint")
    return out


def _load_rgb_splits(name: str, data_dir: str, image_size: int, cache_dir: str | None, splits: tuple[str, ...],
                     min_per_class: int, classes: Callable[[str], dict[str, list[str]]]) -> dict[str, ImageSplit]:
    """Each split's ``classes(split)`` decoded to RGB (or read from the cache ``NAME-SPLIT-SIZE.npz``);
    the splits' classes must be disjoint."""
    _check_dir(data_dir, "data dir")
    cache_dir = cache_dir or _default_cache(data_dir)
    return _check_disjoint({
        s: load_split(classes(s), size=image_size, channels=3, min_per_class=min_per_class,
                      cache_path=os.path.join(cache_dir, f"{name}-{s}-{image_size}.npz")) for s in splits})


def load_miniimagenet(data_dir: str, *, image_size: int = 84, cache_dir: str | None = None,
                      splits: tuple[str, ...] = ("train", "test"), min_per_class: int = 1) -> dict[str, ImageSplit]:
    """miniImageNet-style splits: ``{split: ImageSplit}`` for each of ``splits``.

    Raises:
      ValueError: a missing split, an unreadable or wrongly sized image, a class with too few
        images, or a class in two splits (each named).
    """
    return _load_rgb_splits("miniimagenet", data_dir, image_size, cache_dir, splits, min_per_class,
                            lambda s: folder_classes(data_dir, s))


def load_tieredimagenet(data_dir: str, *, image_size: int = 84, cache_dir: str | None = None,
                        splits: tuple[str, ...] = ("train", "test"),
                        min_per_class: int = 1) -> dict[str, ImageSplit]:
    """tieredImageNet (Ren et al. 2018) from ``ROOT/SPLIT/CLASS/*`` folders: ``{split: ImageSplit}``.

    The standard split is the one the folders hold (351 training, 97 validation and 160 test
    classes, from disjoint ImageNet categories). Every class keeps as many images as the split's
    smallest class (tieredImageNet's classes hold 732-1300); the training split then takes about
    5.4 GB of device memory as uint8 at 84x84.

    Raises:
      ValueError: as ``load_miniimagenet``.
    """
    return _load_rgb_splits("tieredimagenet", data_dir, image_size, cache_dir, splits, min_per_class,
                            lambda s: folder_classes(data_dir, s))


# CIFAR-100's 20 superclasses and their 5 fine classes each (the dataset's own labels).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
CIFAR100_CLASSES = tuple(sorted(c for group in CIFAR100_SUPERCLASSES.values() for c in group))

# CIFAR-FS (Bertinetto et al., ICLR 2019): 64 / 16 / 20 classes; the validation and test lists of
# the authors' split files, training = the other 64.
_CIFARFS_HELD = {
    "val": ("beaver", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
            "motorcycle", "otter", "sea", "shark", "television", "tractor", "beetle"),
    "test": ("baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
             "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm"),
}
CIFARFS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(c for c in CIFAR100_CLASSES if c not in _CIFARFS_HELD["val"] + _CIFARFS_HELD["test"]),
    "val": tuple(sorted(_CIFARFS_HELD["val"])), "test": tuple(sorted(_CIFARFS_HELD["test"]))}

# FC100 (Oreshkin et al., NeurIPS 2018): split by superclass, 12 / 4 / 4.
FC100_SUPERCLASS_SPLITS: dict[str, tuple[str, ...]] = {
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
FC100_SUPERCLASS_SPLITS["train"] = tuple(
    g for g in CIFAR100_SUPERCLASSES if g not in FC100_SUPERCLASS_SPLITS["val"] + FC100_SUPERCLASS_SPLITS["test"])
FC100_SPLITS: dict[str, tuple[str, ...]] = {
    split: tuple(sorted(c for g in groups for c in CIFAR100_SUPERCLASSES[g]))
    for split, groups in FC100_SUPERCLASS_SPLITS.items()}


def _cifar_class_folders(data_dir: str) -> tuple[str, dict[str, str]]:
    """Where CIFAR-100's class folders are (``ROOT/data`` or ``ROOT``) and ``{class: folder}``."""
    for base in (os.path.join(data_dir, "data"), data_dir):
        if os.path.isdir(base):
            found = {n: os.path.join(base, n) for n in sorted(os.listdir(base))
                     if n in CIFAR100_CLASSES and os.path.isdir(os.path.join(base, n))}
            if found:
                return base, found
    raise ValueError(f"{data_dir} holds no CIFAR-100 class folders (expected ROOT/CLASS/*.png or ROOT/data/CLASS/*.png "
                     f"with CIFAR-100's fine labels as folder names, e.g. {', '.join(CIFAR100_CLASSES[:3])}), nor "
                     "ROOT/train, ROOT/test folders of classes")


def _holds_class_folders(path: str) -> bool:
    """Whether ``path`` is a folder of (class) folders, as a pre-split tree's ``ROOT/SPLIT`` is."""
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return any(e.is_dir() for e in entries)


def _split_file(data_dir: str, split: str) -> tuple[str, ...] | None:
    path = os.path.join(data_dir, "splits", "bertinetto", f"{split}.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not names:
        raise ValueError(f"split file {path} lists no classes")
    return names


def cifar_classes(data_dir: str, benchmark: str, split: str) -> dict[str, list[str]]:
    """``{class: [image paths]}`` of one split of CIFAR-FS (``benchmark="cifarfs"``) or FC100.

    Reads ``ROOT/SPLIT/CLASS/*`` as it is when the tree is already split; otherwise picks the
    split's classes (Bertinetto's split files for CIFAR-FS where present, else the built-in
    standard lists) from CIFAR-100's class folders, every one of which must be there.

    Raises:
      ValueError: an unknown benchmark or split, a missing class folder (named), an empty class.
    """
    standard = {"cifarfs": CIFARFS_SPLITS, "fc100": FC100_SPLITS}
    if benchmark not in standard:
        raise ValueError(f"benchmark must be 'cifarfs' or 'fc100', got {benchmark!r}")
    if split not in standard[benchmark]:
        raise ValueError(f"split must be one of train, val, test; got {split!r}")
    _check_dir(data_dir, "data dir")
    if _holds_class_folders(os.path.join(data_dir, split)):  # ROOT/SPLIT/CLASS/*; CIFAR-100's own class "train"
        return folder_classes(data_dir, split)               # is a folder of images, not of classes
    base, folders = _cifar_class_folders(data_dir)
    wanted = (_split_file(data_dir, split) if benchmark == "cifarfs" else None) or standard[benchmark][split]
    missing = [c for c in wanted if c not in folders]
    if missing:
        raise ValueError(f"{benchmark} {split} split: {base} has no folder for class {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = {c: _image_files(folders[c]) for c in wanted}
    empty = [c for c, files in out.items() if not files]
    if empty:
        raise ValueError(f"class {empty[0]} in {base} has no images")
    return out


def load_cifar_fs(data_dir: str, *, image_size: int = 32, cache_dir: str | None = None,
                  splits: tuple[str, ...] = ("train", "test"), min_per_class: int = 1) -> dict[str, ImageSplit]:
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's classes split 64 / 16 / 20 (``{split: ImageSplit}``).

    Raises:
      ValueError: as ``cifar_classes`` and ``load_split``.

    Example:
      >>> len(CIFARFS_SPLITS["train"]), len(CIFARFS_SPLITS["val"]), len(CIFARFS_SPLITS["test"])
      (64, 16, 20)

    Args:
      data_dir: the folder of CIFAR-100's class folders (see the module docstring for the layouts).
      image_size: resize to this (32: no resizing).
      cache_dir: where the decoded-image cache goes (default ``DATA_DIR/.jmaml_cache``).
      splits: which of ``train``, ``val``, ``test`` to load.
      min_per_class: refuse a class with fewer images (an episode's ``shots + queries``).

    Returns:
      ``{split: ImageSplit}``; the splits' classes are disjoint.
    """
    return _load_rgb_splits("cifarfs", data_dir, image_size, cache_dir, splits, min_per_class,
                            lambda s: cifar_classes(data_dir, "cifarfs", s))


def load_fc100(data_dir: str, *, image_size: int = 32, cache_dir: str | None = None,
               splits: tuple[str, ...] = ("train", "test"), min_per_class: int = 1) -> dict[str, ImageSplit]:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60 / 20 / 20 classes.

    Raises:
      ValueError: as ``cifar_classes`` and ``load_split``.

    Example:
      >>> [len(FC100_SPLITS[s]) for s in ("train", "val", "test")]
      [60, 20, 20]

    Args:
      data_dir, image_size, cache_dir, splits, min_per_class: as ``load_cifar_fs``.

    Returns:
      ``{split: ImageSplit}``; no superclass has classes in two splits.
    """
    return _load_rgb_splits("fc100", data_dir, image_size, cache_dir, splits, min_per_class,
                            lambda s: cifar_classes(data_dir, "fc100", s))


# ---- episodes ---------------------------------------------------------------------------------

def check_episode(split: ImageSplit | np.ndarray | jax.Array, ways: int, shots: int, queries: int,
                  what: str = "split") -> None:
    """Checks that ``ways``-way episodes of ``shots`` + ``queries`` images per class fit the split."""
    images = split.images if isinstance(split, ImageSplit) else split
    ways, shots, queries = (check_positive_int(ways, "ways"), check_positive_int(shots, "shots"),
                            check_positive_int(queries, "queries"))
    if images.ndim != 5:
        raise ValueError(f"{what}: images must have shape (classes, per_class, H, W, C), got {images.shape}")
    if images.shape[0] < ways:
        raise ValueError(f"{what} has {images.shape[0]} classes, fewer than ways = {ways}")
    if images.shape[1] < shots + queries:
        raise ValueError(f"{what} has {images.shape[1]} images per class, fewer than shots + queries = "
                         f"{shots} + {queries}")


def sample_episode(key: PRNGKey, images: jax.Array, *, ways: int, shots: int, queries: int) -> Task:
    """One N-way K-shot episode: ``ways`` random classes, ``shots`` + ``queries`` random images each.

    The classes come in random order and are labelled 0..ways−1 in that order, so labels are
    permuted per episode. Support and query are ``Batch(x, y)`` with x float32 in [0, 1] of shape
    ``(ways * shots, H, W, C)`` (resp. ``ways * queries``) and integer labels, grouped by class.
    Pure ``jax.random``: jit- and vmap-able, runs on the device.
    """
    key_classes, key_images = jax.random.split(key)
    num_classes, per_class = images.shape[:2]
    classes = jax.random.permutation(key_classes, num_classes)[:ways]
    picks = jax.vmap(lambda k: jax.random.permutation(k, per_class)[:shots + queries])(
        jax.random.split(key_images, ways))
    x = images[classes[:, None], picks].astype(jnp.float32) / 255.0  # (ways, shots + queries, H, W, C)
    y = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32)[:, None], (ways, shots + queries))
    flat = lambda a, lo, hi: a[:, lo:hi].reshape((ways * (hi - lo),) + a.shape[2:])
    return Task(Batch(flat(x, 0, shots), flat(y, 0, shots)),
                Batch(flat(x, shots, shots + queries), flat(y, shots, shots + queries)))


def sample_tasks(key: PRNGKey, images: jax.Array, num_tasks: int, *, ways: int, shots: int, queries: int) -> Task:
    """A meta-batch of ``num_tasks`` episodes (a leading task axis)."""
    return jax.vmap(lambda k: sample_episode(k, images, ways=ways, shots=shots, queries=queries))(
        jax.random.split(key, num_tasks))


def accuracy_metric(apply):
    """Query accuracy of a classifier's ``apply``: the fraction of argmax logits equal to the label."""
    return lambda params, batch: jnp.mean(jnp.argmax(apply(params, batch.x), axis=-1) == batch.y)


def distribution(train_images: jax.Array | np.ndarray, *, ways: int, shots: int, queries: int,
                 test_images: jax.Array | np.ndarray | None = None, name: str = "images") -> TaskDistribution:
    """N-way K-shot episodes as a ``TaskDistribution``: training episodes from ``train_images``,
    held-out ones from ``test_images`` (classes, per_class, H, W, C, uint8), scored by accuracy.

    The image arrays travel as the distribution's ``data`` (arguments of the compiled programs,
    not constants baked into them).

    Args:
      train_images: the training split, ``(classes, per_class, H, W, C)`` uint8.
      ways, shots, queries: N, K and the query images per class of every episode.
      test_images: the held-out split (same layout), or None.
      name: the distribution's name.

    Returns:
      The ``TaskDistribution`` (accuracy metric).

    Raises:
      ValueError: a split with fewer classes than ``ways`` or images than ``shots + queries``.

    Example:
      >>> import jax, numpy as np
      >>> images = np.zeros((10, 6, 8, 8, 1), np.uint8)  # 10 classes of 6 images, 8x8 grey
      >>> episodes = distribution(images, ways=5, shots=1, queries=2, test_images=images)
      >>> batch = episodes.sample(jax.random.key(0), 3, episodes.data)
      >>> batch.support.x.shape, batch.query.y.shape
      ((3, 5, 8, 8, 1), (3, 10))
    """
    check_episode(train_images, ways, shots, queries, what=f"{name} training images")
    if test_images is not None:
        check_episode(test_images, ways, shots, queries, what=f"{name} test images")
    h, w, c = np.shape(train_images)[2:]
    one = lambda n: Batch((n, h, w, c), (n,))
    return TaskDistribution(
        sample=lambda key, n, images: sample_tasks(key, images, n, ways=ways, shots=shots, queries=queries),
        heldout=lambda key, n, images: sample_tasks(key, images, n, ways=ways, shots=shots, queries=queries),
        make_metric=accuracy_metric, name=name, metric_name="accuracy", higher_is_better=True,
        task_shapes=Task(one(ways * shots), one(ways * queries)),
        data=jnp.asarray(train_images), heldout_data=None if test_images is None else jnp.asarray(test_images))


# ---- the Omniglot and miniImageNet families, for TrainConfig and the CLI ------------------------

EVAL_SEED = 20_170_306
NUM_EVAL_EPISODES = 600


@functools.lru_cache(maxsize=4)
def _splits(task: str, data_dir: str, image_size: int, num_train_classes: int, min_per_class: int,
            cache_dir: str | None = None) -> dict:
    spec = DATASETS[task]
    extra = {"num_train_classes": num_train_classes} if spec.takes_num_train_classes else {}
    return spec.loader(data_dir, image_size=image_size, min_per_class=min_per_class, cache_dir=cache_dir, **extra)


def _config_splits(config) -> dict:
    return _splits(config.task, config.data_dir, _image_size(config), config.num_train_classes,
                   config.num_support + config.num_query, getattr(config, "cache_dir", None))


def data_fingerprint(config) -> str:
    """The fingerprint of a config's image data (its splits' files and decoding), recorded in checkpoints
    so that resuming on changed data is refused."""
    return hashlib.sha256("|".join(s.fingerprint for _, s in sorted(_config_splits(config).items())).encode()
                          ).hexdigest()[:16]


def _image_size(config) -> int:
    return config.image_size or DATASETS[config.task].image_size


def config_split(config, split: str = "train") -> jax.Array:
    """The on-device image array of a config's split, decoded from ``config.data_dir`` (or its cache)
    once per process; checked to hold enough classes for ``ways`` and images per class."""
    data = _config_splits(config)[split]
    check_episode(data, config.ways, config.num_support, config.num_query,
                  what=f"{config.task} {split} split in {config.data_dir}")
    return jnp.asarray(data.images)


def _family_distribution(config) -> TaskDistribution:
    return distribution(config_split(config, "train"), ways=config.ways, shots=config.num_support,
                        queries=config.num_query, test_images=config_split(config, "test"), name=config.task)


def _family_model(config, extra_inputs: int = 0):
    from jmaml.core.models import conv4, resnet12

    if extra_inputs:
        raise ValueError(f"this algorithm adds {extra_inputs} input features to the model; the image tasks' "
                         f"{config.backbone} takes images only")
    spec = DATASETS[config.task]
    if config.backbone == "resnet12":
        return resnet12(config.ways, in_channels=spec.channels, image_size=_image_size(config))
    return conv4(config.ways, in_channels=spec.channels, filters=spec.conv4_filters, strided=spec.conv4_strided,
                 image_size=_image_size(config))


def _family_validate(config) -> None:
    if not config.data_dir:
        raise ValueError(f"task {config.task!r} needs data_dir: the folder holding the dataset")
    check_positive_int(config.ways, "ways")
    if config.ways < 2:
        raise ValueError(f"ways must be >= 2 for classification, got {config.ways}")
    if config.image_size is not None:
        check_positive_int(config.image_size, "image_size")
    check_positive_int(config.num_train_classes, "num_train_classes")
    if config.backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {config.backbone!r}")
    if config.backbone == "resnet12" and _image_size(config) < 16:
        raise ValueError(f"backbone 'resnet12' needs image_size >= 16, got {_image_size(config)}")
    if config.loss != "mse":
        raise ValueError(f"loss applies to sinusoid; image tasks use softmax cross-entropy (got {config.loss!r})")


def _family_protocol(config):
    from jmaml.tasks.family import EvalProtocol

    return EvalProtocol(shots=None, num_steps=config.eval_inner_steps, batch_size=50, label=str(config.num_support),
                        diverged_ratio=float("inf"), describe={
                            "test_episodes": None, "eval_seed": EVAL_SEED, "task": config.task, "ways": config.ways,
                            "shots": [config.num_support], "query_per_class": config.num_query,
                            "steps": config.eval_inner_steps, "metric": "query accuracy, mean and 95% CI",
                            "batch_norm": "transductive (each support and query set's own statistics)"})


def preset(task: str, ways: int = 5, shots: int = 1) -> dict:
    """The literature's MAML settings for a few-shot classification task, as TrainConfig fields.

    Omniglot and miniImageNet: the MAML paper's (Finn et al. 2017, Section 5.2 and its code) --
    inner rate, inner steps at training and at test, meta-batch; 15 query images per class,
    Adam 1e-3, 60,000 meta-steps; no pretrained baseline. tieredImageNet (Ren et al. 2018),
    CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): the miniImageNet settings
    carried over unchanged, the usual practice for MAML baselines on these natural-image benchmarks.

    Raises:
      ValueError: a task without a preset.

    Example:
      >>> preset("miniimagenet", 5, 1)["inner_lr"], preset("cifarfs", 5, 5)["meta_batch_size"]
      (0.01, 2)
    """
    if task not in DATASETS:
        raise ValueError(f"presets exist for {', '.join(DATASETS)}; got {task!r}")
    common = {"num_query": 15, "pretrain": False, "steps": 60_000, "log_every": 100, "checkpoint_every": 1_000,
              "meta_lr": 1e-3}
    return {**common, **DATASETS[task].preset(ways, shots)}


def _omniglot_preset(ways: int, shots: int) -> dict:
    if ways >= 20:
        return {"inner_lr": 0.1, "num_inner_steps": 5, "eval_inner_steps": 5, "meta_batch_size": 16}
    return {"inner_lr": 0.4, "num_inner_steps": 1, "eval_inner_steps": 3, "meta_batch_size": 32}


def _natural_image_preset(ways: int, shots: int) -> dict:
    return {"inner_lr": 0.01, "num_inner_steps": 5, "eval_inner_steps": 10, "meta_batch_size": 4 if shots == 1 else 2}


class Dataset(NamedTuple):
    """A few-shot image dataset: how to load it and what the paper's models and settings are for it.

    Attributes:
      loader: ``loader(data_dir, *, image_size, min_per_class, cache_dir[, num_train_classes])``.
      image_size: the default side length in pixels.
      channels: 1 (greyscale) or 3 (RGB).
      conv4_filters, conv4_strided: the MAML paper's Conv-4 for it (Omniglot: 64 filters, strided
        convolutions; natural images: 32 filters and max-pooling).
      preset: ``preset(ways, shots)`` -> its literature settings (``preset``).
      takes_num_train_classes: the loader splits one pool of classes (Omniglot's 1200 / rest).
    """

    loader: Callable[..., dict]
    image_size: int
    channels: int
    conv4_filters: int
    conv4_strided: bool
    preset: Callable[[int, int], dict]
    takes_num_train_classes: bool = False


DATASETS: dict[str, Dataset] = {
    "omniglot": Dataset(load_omniglot, 28, 1, 64, True, _omniglot_preset, takes_num_train_classes=True),
    "miniimagenet": Dataset(load_miniimagenet, 84, 3, 32, False, _natural_image_preset),
    "tieredimagenet": Dataset(load_tieredimagenet, 84, 3, 32, False, _natural_image_preset),
    "cifarfs": Dataset(load_cifar_fs, 32, 3, 32, False, _natural_image_preset),
    "fc100": Dataset(load_fc100, 32, 3, 32, False, _natural_image_preset),
}
LOADERS = {name: d.loader for name, d in DATASETS.items()}
IMAGE_SIZES = {name: d.image_size for name, d in DATASETS.items()}
BACKBONES = ("conv4", "resnet12")


def family(task: str):
    """Few-shot episodes of one dataset (``DATASETS``) for ``TrainConfig``: Conv-4 (the MAML paper's) or
    ResNet-12 (``backbone``) with softmax cross-entropy, accuracy over 600 test episodes, presets."""
    from jmaml.tasks.family import TaskFamily

    return TaskFamily(distribution=_family_distribution, model=_family_model, loss=lambda config: "xent",
                      validate=_family_validate, protocol=_family_protocol,
                      preset=lambda ways=5, shots=1: preset(task, ways, shots), host_loop_on_cpu=True,
                      fingerprint=data_fingerprint)
