"""Few-shot image classification on a synthetic Omniglot the tests draw: layout discovery, decoding,
the cache, episodes, Conv-4, bad input, and a short meta-training run that must beat chance."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jmaml import Logging, cli
from jmaml.core import models
from jmaml.run import evaluate, train
from jmaml.tasks import images

NUM_CHARS = (8, 8, 8)  # characters per alphabet: 2 alphabets in images_background, 1 in images_evaluation
PER_CLASS = 20  # as in Omniglot


def _glyph(rng: np.random.Generator) -> list[tuple]:
    """A character: a few thick strokes (start, end) on a 105x105 canvas."""
    return [tuple(rng.integers(15, 90, size=4)) for _ in range(3)]


def _draw(strokes, rng: np.random.Generator) -> np.ndarray:
    canvas = np.full((105, 105), 255, np.uint8)
    dy, dx = rng.integers(-4, 5, size=2)
    for x0, y0, x1, y1 in strokes:
        for t in np.linspace(0, 1, 60):
            x, y = int(x0 + t * (x1 - x0)) + dx, int(y0 + t * (y1 - y0)) + dy
            canvas[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = 0
    flip = rng.random(canvas.shape) < 0.01  # a little noise
    canvas[flip] = 255 - canvas[flip]
    return canvas


def write_omniglot(root, num_chars=NUM_CHARS, per_class=PER_CLASS, seed=0):
    rng = np.random.default_rng(seed)
    dirs = [("images_background", "Alpha"), ("images_background", "Beta"), ("images_evaluation", "Gamma")]
    for (split, alphabet), n in zip(dirs, num_chars):
        for c in range(n):
            folder = os.path.join(root, split, alphabet, f"character{c + 1:02d}")
            os.makedirs(folder)
            strokes = _glyph(rng)
            for i in range(per_class):
                Image.fromarray(_draw(strokes, rng)).save(os.path.join(folder, f"{c:04d}_{i:02d}.png"))
    return root


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory):
    return write_omniglot(str(tmp_path_factory.mktemp("omniglot")))


def test_omniglot_layout_decoding_rotations_and_disjoint_splits(omniglot_dir):
    splits = images.load_omniglot(omniglot_dir, num_train_classes=16)
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (4 * 16, PER_CLASS, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (4 * 8, PER_CLASS, 28, 28, 1)
    base = lambda names: {n.split("@")[0] for n in names}
    assert len(base(train.classes)) == 16 and len(base(test.classes)) == 8
    assert not base(train.classes) & base(test.classes)  # no character in both
    # the rotations are classes of their own: class i + 16 is class i turned by 90 degrees
    np.testing.assert_array_equal(train.images[16], np.rot90(train.images[0], 1, axes=(1, 2)))
    # decoded ink is dark on light, as drawn
    assert train.images.mean() > 128 and train.images.min() < 64


def test_cache_is_reused_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    root = write_omniglot(str(tmp_path / "o"), num_chars=(3, 0, 2), per_class=6)
    first = images.load_omniglot(root, num_train_classes=3)
    cache = tmp_path / "o" / ".jmaml_cache"
    assert sorted(os.listdir(cache)) == ["omniglot-images_background-28.npz", "omniglot-images_evaluation-28.npz"]

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(images, "decode", no_decoding)
    again = images.load_omniglot(root, num_train_classes=3)
    np.testing.assert_array_equal(first["train"].images, again["train"].images)
    assert first["test"].classes == again["test"].classes
    # a new image invalidates that split's cache
    folder = tmp_path / "o" / "images_evaluation" / "Gamma" / "character01"
    Image.fromarray(np.zeros((105, 105), np.uint8)).save(folder / "zz.png")
    with pytest.raises(AssertionError, match="decoded although"):
        images.load_omniglot(root, num_train_classes=3)


def test_episodes_shapes_balanced_labels_determinism_and_classes(omniglot_dir):
    data = jnp.asarray(images.load_omniglot(omniglot_dir, num_train_classes=16)["train"].images)
    key = jax.random.key(3)
    ep = jax.jit(lambda k: images.sample_episode(k, data, ways=5, shots=2, queries=3))(key)
    assert ep.support.x.shape == (10, 28, 28, 1) and ep.query.x.shape == (15, 28, 28, 1)
    assert ep.support.x.dtype == jnp.float32 and 0 <= float(ep.support.x.min()) and float(ep.support.x.max()) <= 1
    np.testing.assert_array_equal(np.bincount(np.asarray(ep.support.y)), [2] * 5)
    np.testing.assert_array_equal(np.bincount(np.asarray(ep.query.y)), [3] * 5)
    again = images.sample_episode(key, data, ways=5, shots=2, queries=3)
    # the same images (compared as the stored bytes: jit may compute x / 255 in another rounding on a GPU)
    np.testing.assert_array_equal(np.round(np.asarray(ep.support.x) * 255), np.round(np.asarray(again.support.x) * 255))
    other = images.sample_episode(jax.random.key(4), data, ways=5, shots=2, queries=3)
    assert not np.array_equal(ep.support.x, other.support.x)
    # every label's images come from one class, different labels from different classes, no image twice
    flat = np.asarray(data).reshape(-1, 28 * 28)
    owner = {}
    for x, y in zip(np.concatenate([ep.support.x, ep.query.x]), np.concatenate([ep.support.y, ep.query.y])):
        idx = np.flatnonzero((flat == np.round(np.asarray(x).reshape(-1) * 255)).all(axis=1))
        owner.setdefault(int(y), set()).update(set((idx // PER_CLASS).tolist()))
    assert all(len(v) == 1 for v in owner.values()) and len(set.union(*owner.values())) == 5
    # labels are permuted per episode: over episodes, label 0 is many different classes
    tasks = images.sample_tasks(key, data, 20, ways=5, shots=1, queries=1)
    assert tasks.support.x.shape == (20, 5, 28, 28, 1)
    firsts = {int(np.flatnonzero((flat == np.round(np.asarray(x).reshape(-1) * 255)).all(axis=1))[0] // PER_CLASS)
              for x in tasks.support.x[:, 0]}
    assert len(firsts) > 5


def test_conv4_shapes_and_transductive_batch_norm():
    omni = models.conv4(5)
    p = omni.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
    assert omni.apply(p, x).shape == (6, 5)
    assert p["head"]["w"].shape == (64, 5)  # spatial mean of 64 channels (strided, the paper's Omniglot)
    # batch norm uses the batch at hand: the same image scores differently beside other images
    assert not np.allclose(omni.apply(p, x[:3])[0], omni.apply(p, x)[0], atol=1e-5)
    mini = models.conv4(5, in_channels=3, filters=32, strided=False, image_size=84)
    pm = mini.init(jax.random.key(0))
    assert pm["head"]["w"].shape == (32 * 5 * 5, 5)
    assert mini.apply(pm, jnp.ones((2, 84, 84, 3))).shape == (2, 5)
    with pytest.raises(ValueError, match=r"conv4 expects images of shape \(n, 28, 28, 1\)"):
        omni.apply(p, jnp.ones((2, 28, 28, 3)))


def _write_folder_dataset(root, splits=("train", "test"), classes=3, per_class=6, size=(84, 84)):
    rng = np.random.default_rng(0)
    for s in splits:
        for c in range(classes):
            folder = os.path.join(root, s, f"n{s}{c:03d}")
            os.makedirs(folder)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f"{i}.jpg"))


def test_miniimagenet_folder_and_csv_layouts(tmp_path):
    _write_folder_dataset(str(tmp_path / "m"))
    splits = images.load_miniimagenet(str(tmp_path / "m"))
    assert splits["train"].images.shape == (3, 6, 84, 84, 3)
    assert not set(splits["train"].classes) & set(splits["test"].classes)
    # the CSV layout: images/ plus split.csv files
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    rows = {"train": [], "test": []}
    for s in rows:
        for c in range(3):
            for i in range(6):
                name = f"{s}{c}_{i}.jpg"
                Image.fromarray(np.full((84, 84, 3), 10 * c + i, np.uint8)).save(root / "images" / name)
                rows[s].append(f"{name},n{s}{c}")
        (root / f"{s}.csv").write_text("filename,label\n" + "\n".join(rows[s]) + "\n")
    csv_splits = images.load_miniimagenet(str(root))
    assert csv_splits["test"].images.shape == (3, 6, 84, 84, 3)
    # the same class in two splits is refused
    (root / "test.csv").write_text("filename,label\n" + "\n".join(r.replace("ntest0", "ntrain0") for r in rows["test"]))
    with pytest.raises(ValueError, match="splits test and train share classes|splits train and test share"):
        images.load_miniimagenet(str(root))


def test_bad_input_names_the_path_or_class(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        images.load_omniglot(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither images_background nor images_evaluation"):
        images.load_omniglot(str(tmp_path / "empty"))
    (tmp_path / "empty" / "images_background").mkdir()
    with pytest.raises(ValueError, match="holds no ALPHABET/CHARACTER folders"):
        images.load_omniglot(str(tmp_path / "empty"))
    root = write_omniglot(str(tmp_path / "o"), num_chars=(3, 0, 2), per_class=4)
    bad = os.path.join(root, "images_background", "Alpha", "character02", "0001_00.png")
    with open(bad, "wb") as f:
        f.write(b"not a png at all")
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        images.load_omniglot(root, num_train_classes=3)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(bad, format="PNG")
    with pytest.raises(ValueError, match=f"image {bad} is 60x50 but .* is 105x105"):
        images.load_omniglot(root, num_train_classes=3)
    os.remove(bad)
    with pytest.raises(ValueError, match="class Alpha/character02 has 3 images, fewer than the 5"):
        images.load_omniglot(root, num_train_classes=3, min_per_class=5)
    data = images.load_omniglot(root, num_train_classes=3, rotations=False)["test"]
    with pytest.raises(ValueError, match="has 2 classes, fewer than ways = 5"):
        images.check_episode(data, 5, 1, 1)
    with pytest.raises(ValueError, match=r"3 images per class, fewer than shots \+ queries = 2 \+ 2"):
        images.check_episode(data, 2, 2, 2)


def test_short_meta_training_beats_chance(omniglot_dir, tmp_path):
    code = cli.main(["train", "--task", "omniglot", "--data-dir", omniglot_dir, "--num-train-classes", "16",
                     "--ways", "5", "--shots", "1", "--query-shots", "5", "--image-size", "14",
                     "--meta-batch-size", "4", "--steps", "40", "--log-every", "20", "--out", str(tmp_path / "run"),
                     "--no-eval"])
    assert code == 0
    results = evaluate.evaluate_run(str(tmp_path / "run"), num_tasks=100)
    acc = results["maml"]["1"]["mean"]
    print(f"5-way 1-shot accuracy on held-out synthetic characters: before {acc[0]:.3f}, after "
          f"{len(acc) - 1} steps {acc[-1]:.3f} ± {results['maml']['1']['ci95'][-1]:.3f} (chance 0.2)")
    assert acc[-1] - results["maml"]["1"]["ci95"][-1] > 0.4  # chance is 0.2
    config = train.load_config(str(tmp_path / "run"))
    assert (config.inner_lr, config.num_inner_steps, config.eval_inner_steps) == (0.4, 1, 3)  # the paper's preset
    assert "| maml | 1 | 0.4 |" in evaluate.format_table(results)


def test_image_task_flags_are_checked(tmp_path, capsys):
    assert cli.main(["train", "--task", "omniglot", "--out", str(tmp_path / "a")]) == 2
    assert "needs data_dir" in capsys.readouterr().err
    assert cli.main(["train", "--task", "omniglot", "--data-dir", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data_dir applies to the image tasks"):
        train.TrainConfig(data_dir="x").validate()


def test_cache_is_keyed_on_content_corrupt_caches_rebuild_and_cache_dir(tmp_path, capsys):
    root = write_omniglot(str(tmp_path / "o"), num_chars=(3, 0, 2), per_class=6)
    first = images.load_omniglot(root, num_train_classes=3)
    # an image rewritten with the same size and modification time: the stale pixels are not used
    path = os.path.join(root, "images_evaluation", "Gamma", "character01", "0000_00.png")
    stat = os.stat(path)
    with open(path, "rb") as f:
        original = f.read()
    Image.fromarray(np.full((105, 105), 7, np.uint8)).save(path)
    with open(path, "r+b") as f:  # pad/trim to the same size so that size and mtime match the old file
        data = f.read()
        f.seek(0)
        f.write(data[:len(original)].ljust(len(original), b"\0"))
        f.truncate(len(original))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    again = images.load_omniglot(root, num_train_classes=3)
    assert again["train"].fingerprint != first["train"].fingerprint
    # a corrupt cache file is rebuilt (with a note), not a BadZipFile
    with open(path, "wb") as f:
        f.write(original)
    cache = os.path.join(root, ".jmaml_cache", "omniglot-images_evaluation-28.npz")
    with open(cache, "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    rebuilt = images.load_omniglot(root, num_train_classes=3)
    np.testing.assert_array_equal(rebuilt["test"].images, first["test"].images)
    assert "rebuilding the unreadable image cache" in capsys.readouterr().err
    # --cache-dir: the cache goes elsewhere, the dataset folder is left as it is
    elsewhere = tmp_path / "cache"
    root2 = write_omniglot(str(tmp_path / "o2"), num_chars=(3, 0, 2), per_class=6)
    images.load_omniglot(root2, num_train_classes=3, cache_dir=str(elsewhere))
    assert not os.path.exists(os.path.join(root2, ".jmaml_cache")) and len(os.listdir(elsewhere)) == 2


def test_decompression_bombs_and_non_utf8_names(tmp_path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("1", (9000, 9000)).save(folder / "big.png")  # 81 M pixels in a few kB
    with pytest.raises(ValueError, match=r"cannot read image .*big.png: 9000x9000 pixels"):
        images.decode(str(folder / "big.png"), 28, 1)
    odd = tmp_path / "odd"
    odd.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    Image.fromarray(np.zeros((105, 105), np.uint8)).save(os.path.join(str(odd), name), format="PNG")
    split = images.load_split({os.fsdecode(b"cls\xff"): [os.path.join(str(odd), name)]}, size=28, channels=1,
                              cache_path=str(tmp_path / "c.npz"))
    assert split.images.shape == (1, 1, 28, 28, 1) and split.fingerprint


def test_resuming_on_changed_data_is_refused_unless_asked(tmp_path):
    root = write_omniglot(str(tmp_path / "o"), num_chars=(6, 0, 4), per_class=6)
    config = train.TrainConfig(task="omniglot", data_dir=root, num_train_classes=6, ways=2, num_support=1,
                               num_query=2, meta_batch_size=2, steps=4, log_every=2, checkpoint_every=2,
                               pretrain=False, inner_lr=0.4, hidden=(40, 40))
    with pytest.raises(train.Interrupted):
        train.train(config, str(tmp_path / "run"), stop_at_step=2, stream=io.StringIO())
    path = os.path.join(root, "images_background", "Alpha", "character01", "0000_00.png")
    Image.fromarray(np.zeros((105, 105), np.uint8)).save(path)
    images._splits.cache_clear()
    from jmaml.engine import checkpoint
    from jmaml.run import recipes

    recipes.build_tasks.cache_clear()
    recipes.phase_parts.cache_clear()
    with pytest.raises(checkpoint.CheckpointError, match="trained on other data"):
        train.train(config, str(tmp_path / "run"), resume=True, stream=io.StringIO())
    state = train.train(config, str(tmp_path / "run"), resume=True, stream=io.StringIO(), allow=("changed-data",))
    assert int(state["maml"].step) == 4


def test_an_unwritable_cache_is_skipped_with_a_note(tmp_path, capsys):
    root = write_omniglot(str(tmp_path / "o"), num_chars=(3, 0, 2), per_class=6)
    (tmp_path / "file").write_text("a file where the cache folder would go")
    splits = images.load_omniglot(root, num_train_classes=3, cache_dir=str(tmp_path / "file" / "cache"))
    assert splits["train"].images.shape[0] == 12
    assert "cannot write the image cache" in capsys.readouterr().err


# ---- CIFAR-FS, FC100, tieredImageNet and ResNet-12 ---------------------------------------------

def write_cifar100(root, per_class=6, seed=0, classes=None, nested=True):
    """CIFAR-100 as class folders of 32x32 PNGs (ROOT/data/CLASS/*.png), each class a colour pattern
    of its own plus noise."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "data") if nested else root
    for name in classes or images.CIFAR100_CLASSES:
        folder = os.path.join(base, name)
        os.makedirs(folder)
        pattern = np.kron(rng.integers(0, 256, size=(4, 4, 3)), np.ones((8, 8, 1)))
        for i in range(per_class):
            img = np.clip(pattern + rng.normal(0, 20, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{name}_{i}.png"))
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_cifar100(str(tmp_path_factory.mktemp("cifar100")))


def test_standard_cifar_splits_are_the_published_class_lists():
    # 100 classes, each in one superclass; CIFAR-FS 64/16/20 and FC100 60/20/20 partition them.
    assert len(images.CIFAR100_CLASSES) == 100 and len(images.CIFAR100_SUPERCLASSES) == 20
    for splits in (images.CIFARFS_SPLITS, images.FC100_SPLITS):
        parts = [set(splits[s]) for s in ("train", "val", "test")]
        assert set().union(*parts) == set(images.CIFAR100_CLASSES) and sum(map(len, parts)) == 100
    assert [len(images.CIFARFS_SPLITS[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert [len(images.FC100_SPLITS[s]) for s in ("train", "val", "test")] == [60, 20, 20]
    # FC100: no superclass is split between train and test (that is its point)
    group = {c: g for g, cs in images.CIFAR100_SUPERCLASSES.items() for c in cs}
    assert not {group[c] for c in images.FC100_SPLITS["train"]} & {group[c] for c in images.FC100_SPLITS["test"]}
    # a few published members (Bertinetto et al.'s test list; Oreshkin et al.'s test superclasses)
    assert {"whale", "poppy", "rocket", "woman"} <= set(images.CIFARFS_SPLITS["test"])
    assert {"beaver", "bee", "fox", "baby"} <= set(images.FC100_SPLITS["test"])


def test_cifarfs_and_fc100_loaders_shapes_disjoint_and_deterministic(cifar_dir):
    fs = images.load_cifar_fs(cifar_dir, splits=("train", "val", "test"))
    assert {s: fs[s].images.shape for s in fs} == {"train": (64, 6, 32, 32, 3), "val": (16, 6, 32, 32, 3),
                                                 "test": (20, 6, 32, 32, 3)}
    assert set(fs["test"].classes) == set(images.CIFARFS_SPLITS["test"])
    fc = images.load_fc100(cifar_dir, splits=("train", "val", "test"))
    assert [fc[s].images.shape[0] for s in ("train", "val", "test")] == [60, 20, 20]
    for splits in (fs, fc):
        names = [set(splits[s].classes) for s in splits]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    # the pixels are the files' (decoded, not resized at 32x32)
    first = sorted(os.listdir(os.path.join(cifar_dir, "data", fs["test"].classes[0])))[0]
    want = np.asarray(Image.open(os.path.join(cifar_dir, "data", fs["test"].classes[0], first)))
    np.testing.assert_array_equal(fs["test"].images[0, 0], want)
    again = images.load_cifar_fs(cifar_dir)  # from the cache: the same arrays
    np.testing.assert_array_equal(again["train"].images, fs["train"].images)
    a = images.sample_tasks(jax.random.key(3), jnp.asarray(fc["train"].images), 4, ways=5, shots=1, queries=2)
    b = images.sample_tasks(jax.random.key(3), jnp.asarray(fc["train"].images), 4, ways=5, shots=1, queries=2)
    np.testing.assert_array_equal(a.support.x, b.support.x)
    assert a.support.x.shape == (4, 5, 32, 32, 3) and a.query.x.shape == (4, 10, 32, 32, 3)


def test_cifarfs_reads_bertinetto_split_files_and_presplit_trees(tmp_path, cifar_dir):
    root = tmp_path / "own"
    write_cifar100(str(root), per_class=2, classes=["apple", "bear", "camel", "dolphin"])
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for split, names in (("train", "apple\nbear\n"), ("test", "camel\ndolphin\n")):
        (root / "splits" / "bertinetto" / f"{split}.txt").write_text(names)
    own = images.load_cifar_fs(str(root))
    assert own["train"].classes == ("apple", "bear") and own["test"].classes == ("camel", "dolphin")
    # ROOT/SPLIT/CLASS: read as it is
    tree = tmp_path / "tree"
    for split, names in (("train", ["otter", "ray"]), ("test", ["seal"])):
        write_cifar100(str(tree / split), per_class=2, classes=names, nested=False)
    split = images.load_fc100(str(tree))
    assert split["train"].classes == ("otter", "ray") and split["test"].images.shape == (1, 2, 32, 32, 3)


def test_cifar_and_tiered_bad_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no CIFAR-100 class folders"):
        images.load_cifar_fs(str(tmp_path / "empty"))
    root = write_cifar100(str(tmp_path / "partial"), per_class=1,
                          classes=[c for c in images.CIFAR100_CLASSES if c != "whale"])
    with pytest.raises(ValueError, match="cifarfs test split: .* has no folder for class 'whale'"):
        images.load_cifar_fs(root)
    with pytest.raises(ValueError, match="no folder for class 'whale'"):
        images.load_fc100(root)  # whale is an aquatic mammal: FC100's test split
    os.makedirs(tmp_path / "partial" / "data" / "whale")
    with pytest.raises(ValueError, match="class whale in .* has no images"):
        images.load_cifar_fs(root)
    with pytest.raises(ValueError, match="benchmark must be"):
        images.cifar_classes(root, "cifar10", "train")
    with pytest.raises(ValueError, match="no split 'train' in"):
        images.load_tieredimagenet(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        images.load_fc100(str(tmp_path / "missing"))


def test_tieredimagenet_folder_layout(tmp_path):
    _write_folder_dataset(str(tmp_path / "t"))
    splits = images.load_tieredimagenet(str(tmp_path / "t"))
    assert splits["train"].images.shape == (3, 6, 84, 84, 3)
    assert os.listdir(tmp_path / "t" / ".jmaml_cache") and all(
        n.startswith("tieredimagenet-") for n in os.listdir(tmp_path / "t" / ".jmaml_cache"))


def test_resnet12_shapes_parameter_count_and_residual_blocks():
    net = models.resnet12(5)
    params = jax.eval_shape(net.init, jax.random.key(0))  # shapes only: nothing is computed
    assert jax.eval_shape(net.apply, params, jax.ShapeDtypeStruct((7, 84, 84, 3), jnp.float32)).shape == (7, 5)
    # 64-160-320-640 ResNet-12: about 12.4M parameters, as reported for it (Lee et al. 2019)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    convs = sum(9 * ci * co + 2 * co for ci, co in [(3, 64), (64, 64), (64, 64), (64, 160), (160, 160),
                                                      (160, 160), (160, 320), (320, 320), (320, 320),
                                                      (320, 640), (640, 640), (640, 640)])
    shortcuts = sum(ci * co + 2 * co for ci, co in [(3, 64), (64, 160), (160, 320), (320, 640)])
    assert count == convs + shortcuts + 640 * 5 + 5 and 12.3e6 < count < 12.5e6
    small = models.resnet12(5, widths=(4, 4, 8, 8), image_size=32)
    p = small.init(jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (10, 32, 32, 3))
    assert small.apply(p, x).shape == (10, 5)
    # transductive batch norm: the output for a set does not depend on the set's order
    perm = jnp.arange(10)[::-1]
    # (float32 sums in another order: CI saw 1.9e-6 apart)
    np.testing.assert_allclose(small.apply(p, x[perm]), small.apply(p, x)[perm], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"resnet12 expects images of shape \(n, 32, 32, 3\)"):
        small.apply(p, x[..., :1])
    with pytest.raises(ValueError, match="too small"):
        models.resnet12(5, image_size=8)
    with pytest.raises(ValueError, match="four block widths"):
        models.resnet12(5, widths=(4, 4))


def test_short_resnet12_meta_training_on_synthetic_cifar_beats_chance(cifar_dir):
    import optax

    from jmaml import fit, learners, make_loss

    fs = images.load_cifar_fs(cifar_dir, image_size=16)
    dist = images.distribution(fs["train"].images, ways=5, shots=1, queries=2, test_images=fs["test"].images,
                               name="cifarfs")
    net = models.resnet12(5, widths=(4, 4, 8, 8), image_size=16)
    learner = learners.maml(make_loss(net.apply, "xent"), inner_lr=0.1, num_inner_steps=1)
    state = fit(learner, dist, optax.adam(3e-3), net.init(jax.random.key(0)), steps=20, meta_batch_size=4,
                log=Logging(every=20, progress=False))
    report = evaluate.evaluate(learner, state.params, dist, apply=net.apply, num_tasks=60, num_steps=1, key=1)
    acc, ci = report["all"]["mean"][-1], report["all"]["ci95"][-1]
    print(f"ResNet-12, 5-way 1-shot on held-out synthetic CIFAR-FS classes: {acc:.3f} ± {ci:.3f} (chance 0.2)")
    assert acc - ci > 0.3  # 20 meta-steps of a 4-8 channel ResNet-12: well clear of chance, not yet good


def test_cifarfs_cli_run_with_preset_beats_chance_and_backbone_flag(cifar_dir, tmp_path, capsys):
    # the preset: the MAML paper's miniImageNet settings (kept where no flag overrides them)
    assert {k: v for k, v in train.image_preset("cifarfs", 5, 1).items() if k in (
        "inner_lr", "num_inner_steps", "eval_inner_steps", "meta_batch_size", "num_query", "steps")} == {
        "inner_lr": 0.01, "num_inner_steps": 5, "eval_inner_steps": 10, "meta_batch_size": 4, "num_query": 15,
        "steps": 60_000}
    code = cli.main(["train", "--task", "cifarfs", "--data-dir", cifar_dir, "--ways", "5", "--shots", "1",
                     "--query-shots", "2", "--meta-batch-size", "4", "--steps", "20", "--log-every", "20",
                     "--inner-steps", "1", "--eval-inner-steps", "1", "--inner-lr", "0.1", "--image-size", "16",
                     "--out", str(tmp_path / "run"), "--no-eval"])
    assert code == 0, capsys.readouterr().err
    config = train.load_config(str(tmp_path / "run"))
    assert (config.meta_lr, config.num_query, config.backbone, config.pretrain) == (1e-3, 2, "conv4", False)
    results = evaluate.evaluate_run(str(tmp_path / "run"), num_tasks=60)
    acc, ci = results["maml"]["1"]["mean"], results["maml"]["1"]["ci95"]
    assert acc[-1] - ci[-1] > 0.4  # chance is 0.2
    assert cli.main(["train", "--task", "sinusoid", "--backbone", "resnet12", "--out", str(tmp_path / "s")]) == 2
    assert "backbone applies to the image tasks" in capsys.readouterr().err
    cfg = train.TrainConfig(task="fc100", data_dir=cifar_dir, backbone="resnet12", image_size=12)
    with pytest.raises(ValueError, match="resnet12' needs image_size >= 16"):
        cfg.validate()


def test_a_flat_cifar_tree_with_its_class_named_train_is_not_taken_for_a_split(tmp_path):
    root = write_cifar100(str(tmp_path / "flat"), per_class=2, nested=False)  # ROOT/CLASS/*.png, README's layout
    assert os.path.isdir(os.path.join(root, "train"))  # CIFAR-100's class "train" (vehicles_1)
    fs = images.load_cifar_fs(root, splits=("train", "test"))
    assert fs["train"].images.shape == (64, 2, 32, 32, 3) and set(fs["test"].classes) == set(
        images.CIFARFS_SPLITS["test"])


def test_a_short_class_is_reported_and_an_oversized_image_size_is_refused(tmp_path, capsys):
    root = tmp_path / "classes"
    write_cifar100(str(root), per_class=3, classes=["apple", "bear"], nested=False)
    os.remove(root / "bear" / "bear_2.png")
    split = images.load_split(images.folder_classes(str(tmp_path), "classes"), size=32, channels=3)
    assert split.images.shape == (2, 2, 32, 32, 3)
    assert "every class keeps 2 images, the count of its smallest class (bear)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"image_size 60000: .* GiB, more than half this machine.s memory"):
        images.load_split(images.folder_classes(str(tmp_path), "classes"), size=60000, channels=3)
