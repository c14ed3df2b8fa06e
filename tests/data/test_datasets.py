import numpy as np
import pytest
import torch
from PIL import Image

from zsq.data import load_dataset, load_images_tensor, parse_spec
from zsq.errors import ZsqError
from zsq.models.meta import ModelMeta

CIFAR = ModelMeta("cifar_like", 10, (3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIG = ModelMeta("imagenet_like", 1000, (3, 224, 224), (0.5,) * 3, (0.25,) * 3, resize=256)
MEAN = np.array(CIFAR.mean, dtype=np.float32)
STD = np.array(CIFAR.std, dtype=np.float32)


def _norm(hwc: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    return ((hwc.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)


def _npz(path, n=6, size=32, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 10 if labels is None else np.asarray(labels)
    np.savez(path, x=x, y=y)
    return x, y


def test_npz_values_and_labels(tmp_path):
    x, y = _npz(tmp_path / "d.npz")
    ds = load_dataset(str(tmp_path / "d.npz"), CIFAR)
    assert len(ds) == 6
    img, label = ds[4]
    assert isinstance(label, int) and label == 4
    assert img.dtype == torch.float32 and img.shape == (3, 32, 32)
    np.testing.assert_allclose(img.numpy(), _norm(x[4]), rtol=0, atol=1e-5)


def test_npz_larger_images_are_centre_cropped(tmp_path):
    x, _ = _npz(tmp_path / "d.npz", size=36)
    img, _ = load_dataset(tmp_path / "d.npz", CIFAR)[1]
    np.testing.assert_allclose(img.numpy(), _norm(x[1, 2:34, 2:34]), atol=1e-5)


def test_slices(tmp_path):
    x, y = _npz(tmp_path / "d.npz", n=10)
    p = str(tmp_path / "d.npz")
    ds = load_dataset(p + "[3:7]", CIFAR)
    assert len(ds) == 4 and ds[0][1] == 3 and ds[3][1] == 6
    np.testing.assert_allclose(ds[0][0].numpy(), _norm(x[3]), atol=1e-5)
    assert [ds[i][1] for i in range(2)] == [3, 4]
    assert len(load_dataset(p + "[:2]", CIFAR)) == 2
    tail = load_dataset(p + "[-3:]", CIFAR)
    assert [tail[i][1] for i in range(3)] == [7, 8, 9]
    assert len(load_dataset(p + "[8:]", CIFAR)) == 2
    with pytest.raises(ZsqError, match="selects no images"):
        load_dataset(p + "[20:30]", CIFAR)
    s = parse_spec("a/b.npz[1017:2041]")
    assert (str(s.path), s.start, s.stop) == ("a/b.npz", 1017, 2041)


def test_slice_restricts_label_check(tmp_path):
    _npz(tmp_path / "d.npz", n=4, labels=[0, 1, 2, 12])
    assert len(load_dataset(f"{tmp_path}/d.npz[:3]", CIFAR)) == 3
    with pytest.raises(ZsqError, match="label 12 does not fit model cifar_like with 10 classes"):
        load_dataset(f"{tmp_path}/d.npz", CIFAR)


def test_bad_inputs(tmp_path):
    with pytest.raises(ZsqError, match="data not found"):
        load_dataset(tmp_path / "missing.npz", CIFAR)
    _npz(tmp_path / "small.npz")
    no_resize_224 = ModelMeta("m224", 1000, (3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ZsqError, match="images are 32x32 but model m224 takes 224x224"):
        load_dataset(tmp_path / "small.npz", no_resize_224)
    with pytest.raises(ZsqError, match="too small for model imagenet_like"):
        load_dataset(tmp_path / "small.npz", BIG)
    _npz(tmp_path / "neg.npz", labels=[0, -1, 2, 3, 4, 5])
    with pytest.raises(ZsqError, match="negative label"):
        load_dataset(tmp_path / "neg.npz", CIFAR)
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ZsqError, match="needs arrays 'x' and 'y'"):
        load_dataset(tmp_path / "nox.npz", CIFAR)
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 32, 32, 3), np.float32), y=np.zeros(2, int))
    with pytest.raises(ZsqError, match="must be uint8"):
        load_dataset(tmp_path / "float.npz", CIFAR)
    np.savez(tmp_path / "nchw.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=np.zeros(2, int))
    with pytest.raises(ZsqError, match="channels-last"):
        load_dataset(tmp_path / "nchw.npz", CIFAR)
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    with pytest.raises(ZsqError, match="cannot read"):
        load_dataset(tmp_path / "corrupt.npz", CIFAR)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ZsqError, match="must be an .npz"):
        load_dataset(tmp_path / "f.txt", CIFAR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZsqError, match="not a data set"):
        load_dataset(tmp_path / "empty", CIFAR)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_labels_csv_folder_with_resize_and_crop(tmp_path):
    rng = np.random.default_rng(1)
    meta = ModelMeta("t16", 5, (3, 16, 16), (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), resize=16)
    arrs = [rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrs):
        _png(tmp_path / "images" / f"im{i}.png", a)
    (tmp_path / "labels.csv").write_text("filename,label,wnid\nim2.png,4,n2\nim0.png,1,n0\n")
    ds = load_dataset(tmp_path, meta)
    assert len(ds) == 2 and ds[0][1] == 4 and ds[1][1] == 1
    # 20x30 (w x h): shorter side 20 -> 16, so 16x24; centre crop rows 4..20.
    resized = np.asarray(Image.fromarray(arrs[2]).resize((16, 24), Image.BILINEAR))
    expect = _norm(resized[4:20], np.array(meta.mean, np.float32), np.array(meta.std, np.float32))
    np.testing.assert_allclose(ds[0][0].numpy(), expect, atol=1e-5)


def test_labels_csv_errors(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "labels.csv").write_text("filename,label\na.png,1\nb.png,2\n")
    with pytest.raises(ZsqError, match="1 listed images are missing"):
        load_dataset(tmp_path, CIFAR)
    (tmp_path / "labels.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(ZsqError, match="needs columns 'filename,label'"):
        load_dataset(tmp_path, CIFAR)
    (tmp_path / "labels.csv").write_text("filename,label\na.png,cat\n")
    with pytest.raises(ZsqError, match="not an integer"):
        load_dataset(tmp_path, CIFAR)
    (tmp_path / "labels.csv").write_text("filename,label\na.png,10\n")
    with pytest.raises(ZsqError, match="label 10 does not fit"):
        load_dataset(tmp_path, CIFAR)


def test_image_folder_tree(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _png(tmp_path / "zebra" / "1.png", a)
    _png(tmp_path / "ant" / "x.png", b)
    _png(tmp_path / "ant" / "y.PNG", a)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path, CIFAR)
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1]  # classes in sorted order: ant=0, zebra=1
    np.testing.assert_allclose(ds[0][0].numpy(), _norm(b), atol=1e-5)
    np.testing.assert_allclose(ds[2][0].numpy(), _norm(a), atol=1e-5)


def test_load_images_tensor(tmp_path):
    x, y = _npz(tmp_path / "d.npz", n=5)
    xs, ys = load_images_tensor(str(tmp_path / "d.npz") + "[1:]", CIFAR, n=3)
    assert xs.shape == (3, 3, 32, 32) and ys.tolist() == [1, 2, 3]
    np.testing.assert_allclose(xs[2].numpy(), _norm(x[3]), atol=1e-5)
    xs, _ = load_images_tensor(tmp_path / "d.npz", CIFAR)
    assert xs.shape[0] == 5
