"""The paper-profile loaders, on a small local fixture laid out like CIFAR-10-C."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data.corruption_benchmarks import build_stream, fetch_benchmark, load_cifar_c, md5sum
from shared.models.pretrained import build_source_model


@pytest.fixture
def fake_cifar10c(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    per = 10_000
    images = np.zeros((5 * per, 32, 32, 3), dtype=np.uint8)
    for s in range(5):  # each severity block has its own constant intensity, to check the slicing
        images[s * per:(s + 1) * per] = 40 * (s + 1)
    np.save(folder / "gaussian_noise.npy", images)
    np.save(folder / "labels.npy", np.tile(rng.integers(0, 10, per), 5).astype(np.uint8))
    return tmp_path


def test_load_cifar_c_slices_the_severity_block_and_scales_to_unit_range(fake_cifar10c):
    data = load_cifar_c("cifar10c", "gaussian_noise", 3, root=fake_cifar10c, n=100)
    assert data.x.shape == (100, 3, 32, 32) and data.x.dtype == torch.float32
    assert torch.allclose(data.x, torch.full_like(data.x, 120 / 255))
    with pytest.raises(FileNotFoundError, match="fetch_benchmark"):
        load_cifar_c("cifar10c", "fog", 1, root=fake_cifar10c)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        load_cifar_c("cifar10c", "rain", 1, root=fake_cifar10c)


def test_build_stream_has_the_same_shape_for_the_real_benchmark_and_digits_c(fake_cifar10c):
    real = build_stream("cifar10c", [("gaussian_noise", 5), ("gaussian_noise", 1)], batch_size=64, n_per_domain=128, root=fake_cifar10c)
    quick = build_stream("digits-c", [("gaussian_noise", 5), ("gaussian_noise", 1)], batch_size=64, n_per_domain=128)
    assert len(real) == len(quick) == 4
    assert [b.severity for b in real] == [b.severity for b in quick] == [5, 5, 1, 1]
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        build_stream("svhn", [], batch_size=1)


def test_fetch_refuses_a_corrupted_archive(tmp_path, monkeypatch):
    (tmp_path / "CIFAR-10-C.tar").write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="does not match the published"):
        fetch_benchmark("cifar10c", root=tmp_path)
    assert md5sum(tmp_path / "CIFAR-10-C.tar") == __import__("hashlib").md5(b"not the archive").hexdigest()


def test_build_source_model_names_the_allowed_models():
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        build_source_model("resnet18")


def _fake_cifar_test_batch(root, n=50):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((n, 3 * 32 * 32), dtype=np.uint8)
    data[:, : 32 * 32] = 255  # the red channel full, the others empty: checks the CHW layout
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": list(np.arange(n) % 10)}, f)


def test_clean_cifar_test_images_and_the_clean_domain_of_a_stream(fake_cifar10c):
    from shared.data.corruption_benchmarks import load_clean

    with pytest.raises(FileNotFoundError, match="python version of CIFAR"):
        load_clean("cifar10c", root=fake_cifar10c)
    _fake_cifar_test_batch(fake_cifar10c)
    clean = load_clean("cifar10c", root=fake_cifar10c, n=20)
    assert clean.x.shape == (20, 3, 32, 32) and clean.y.tolist() == [i % 10 for i in range(20)]
    assert clean.x[:, 0].eq(1).all() and clean.x[:, 1:].eq(0).all()
    other = load_clean("cifar10c", root=fake_cifar10c, n=20, subset_seed=1)  # another fixed subset (e.g. Fisher samples)
    assert not torch.equal(other.y, clean.y) and len(other.y) == 20
    stream = build_stream("cifar10c", [("gaussian_noise", 5), ("clean", 0)], batch_size=16, n_per_domain=32, root=fake_cifar10c)
    assert [(b.domain, b.severity) for b in stream] == [("gaussian_noise", 5)] * 2 + [("clean", 0)] * 2
