"""The real corruption benchmarks of the TTA papers (CIFAR-10-C, CIFAR-100-C, ImageNet-C) and one
entry point that builds a stream from either them (``paper`` profile) or digits-c (``quick``).

A chapter calls :func:`build_stream` with the dataset name of its profile; everything after that
(adapters, :func:`shared.tta.run_stream`, metrics) is the same code in both profiles.

The real data are **not** downloaded by the book's tests (no machine here can reach them). On your
machine, :func:`fetch_benchmark` downloads the archive from Zenodo, checks its MD5 and unpacks it
under ``root`` (default ``$ENTROPY_BOOK_DATA`` or ``~/data``); the loaders then read the standard
layouts: ``<root>/CIFAR-10-C/<corruption>.npy`` (50,000 images: 10,000 per severity 1-5, in order)
plus ``labels.npy``, and ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``. The clean test
images (the domain ``("clean", 0)``, e.g. EATA's forgetting blocks and Fisher samples) come from the
original test sets: ``<root>/cifar-10-batches-py/test_batch`` and ``<root>/cifar-100-python/test``
(the python versions of CIFAR, https://www.cs.toronto.edu/~kriz/cifar.html) and
``<root>/ImageNet/val/<wnid>/*.JPEG`` (the validation set in ImageFolder layout).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.data import digits_c
from shared.data.digits_c import Batch, DigitsSplit, Stream, _order


@dataclass(frozen=True)
class Benchmark:
    """Where a corruption benchmark lives and how to check it."""

    folder: str
    url: str
    md5: str
    corruptions: tuple[str, ...]
    per_severity: int


# The 15 standard corruptions of Hendrycks & Dietterich (ICLR 2019), in the order Tent/CoTTA use.
STANDARD_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)

BENCHMARKS: dict[str, Benchmark] = {
    # Zenodo records 2535967 (CIFAR-10-C) and 3555552 (CIFAR-100-C); MD5s as published on the records.
    "cifar10c": Benchmark("CIFAR-10-C", "https://zenodo.org/record/2535967/files/CIFAR-10-C.tar",
                          "56bf5dcef84df0e2308c6dcbcbbd8499", STANDARD_CORRUPTIONS, 10_000),
    "cifar100c": Benchmark("CIFAR-100-C", "https://zenodo.org/record/3555552/files/CIFAR-100-C.tar",
                           "11f0ed0f1191edbf9fa23466ae6021d3", STANDARD_CORRUPTIONS, 10_000),
    # ImageNet-C is published per corruption group on Zenodo record 2235448 (blur.tar, digital.tar,
    # extra.tar, noise.tar, weather.tar); unpack all into <root>/ImageNet-C. 50,000 images per severity.
    "imagenetc": Benchmark("ImageNet-C", "https://zenodo.org/record/2235448", "", STANDARD_CORRUPTIONS, 50_000),
}
DATASETS: tuple[str, ...] = ("digits-c", *BENCHMARKS)


def data_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$ENTROPY_BOOK_DATA``, else ``~/data``."""
    return Path(root or os.environ.get("ENTROPY_BOOK_DATA", Path.home() / "data"))


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The MD5 hex digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_benchmark(name: str, root: str | Path | None = None) -> Path:
    """Download, check and unpack a CIFAR-C archive into ``root`` (skipped when already there).

    Raises ``ValueError`` on a checksum mismatch (the partial archive is kept for inspection).
    """
    bench = _benchmark(name)
    target = data_root(root) / bench.folder
    if target.is_dir() and any(target.iterdir()):
        return target
    if not bench.md5:
        raise ValueError(f"{name} has no single archive: download it from {bench.url} and unpack it into {target}")
    archive = data_root(root) / f"{bench.folder}.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    if not archive.exists():
        urllib.request.urlretrieve(bench.url, archive)  # noqa: S310 (a fixed https URL)
    got = md5sum(archive)
    if got != bench.md5:
        raise ValueError(f"{archive}: MD5 {got} does not match the published {bench.md5}; delete it and retry")
    with tarfile.open(archive) as tar:
        tar.extractall(archive.parent, filter="data")
    return target


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: allowed are {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_cifar_c(name: str, corruption: str, severity: int, root: str | Path | None = None, n: int | None = None) -> DigitsSplit:
    """Images ``[N, 3, 32, 32]`` in ``[0, 1]`` and labels of a CIFAR-C corruption at one severity.

    Reads ``<root>/<folder>/<corruption>.npy`` (uint8 ``[50000, 32, 32, 3]``, severities 1-5 in blocks
    of 10,000) and ``labels.npy``, as published. ``n`` keeps the first ``n`` images, as Tent/CoTTA do.
    """
    bench = _benchmark(name)
    if corruption not in bench.corruptions:
        raise ValueError(f"unknown corruption {corruption!r} for {name}: allowed are {', '.join(bench.corruptions)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity={severity} is not allowed: severity must be one of 1, 2, 3, 4, 5")
    folder = data_root(root) / bench.folder
    if not (folder / f"{corruption}.npy").exists():
        raise FileNotFoundError(f"{folder / (corruption + '.npy')} not found: run fetch_benchmark({name!r}) on a machine with internet")
    lo, hi = (severity - 1) * bench.per_severity, severity * bench.per_severity
    images = np.load(folder / f"{corruption}.npy", mmap_mode="r")[lo:hi]
    labels = np.load(folder / "labels.npy")[lo:hi]
    if n is not None:
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return DigitsSplit(x, torch.from_numpy(labels.astype(np.int64)))


def load_imagenet_c(corruption: str, severity: int, root: str | Path | None = None, n: int | None = None, size: int = 224) -> DigitsSplit:
    """ImageNet-C images (center-cropped to ``size``, in ``[0, 1]``; normalise inside the model) and labels.

    Needs torchvision (the ``paper`` extra); classes are the sorted WordNet ids, as in ImageFolder.
    """
    from torchvision import datasets, transforms  # the paper extra; never imported by the quick profile

    folder = data_root(root) / "ImageNet-C" / corruption / str(severity)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: download ImageNet-C from {BENCHMARKS['imagenetc'].url}")
    tf = transforms.Compose([transforms.CenterCrop(size), transforms.ToTensor()])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    count = len(ds) if n is None else min(n, len(ds))
    ids = np.random.default_rng(0).permutation(len(ds))[:count]  # a fixed random subset, as Tent's 5,000
    xs, ys = zip(*(ds[int(i)] for i in ids))
    return DigitsSplit(torch.stack(xs), torch.tensor(ys))


def corruptions_of(dataset: str) -> tuple[str, ...]:
    """The corruptions of a dataset in their standard order: digits-c's own 10, or the benchmarks' 15."""
    if dataset == "digits-c":
        return digits_c.CORRUPTIONS
    return _benchmark(dataset).corruptions


CLEAN_TEST_SETS: dict[str, tuple[str, str]] = {
    "cifar10c": ("cifar-10-batches-py/test_batch", "labels"),
    "cifar100c": ("cifar-100-python/test", "fine_labels"),
}
"""Where each CIFAR benchmark's clean test images live under the data root, and their label key."""


def load_clean(name: str, root: str | Path | None = None, n: int | None = None, subset_seed: int = 0,
               size: int = 224) -> DigitsSplit:
    """The clean test images of a benchmark (``"clean"`` domain), in ``[0, 1]``, with their labels.

    CIFAR: the 10,000 images of the python-version test batch, the first ``n`` (``subset_seed=0``) or a
    random ``n`` drawn with ``subset_seed``. ImageNet: the validation set (resized to 256, center-cropped
    to ``size``, as the standard evaluation; needs torchvision), a fixed random subset of ``n`` drawn
    with ``subset_seed``. Another seed gives another subset: e.g. EATA's Fisher samples (seed 1) apart
    from its clean test blocks (seed 0) when ``n`` is small.
    """
    _benchmark(name)
    if name == "imagenetc":
        from torchvision import datasets, transforms  # the paper extra; never imported by the quick profile

        folder = data_root(root) / "ImageNet" / "val"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: put the ImageNet validation set there, one folder per WordNet id")
        ds = datasets.ImageFolder(str(folder), transform=transforms.Compose(
            [transforms.Resize(256), transforms.CenterCrop(size), transforms.ToTensor()]))
        count = len(ds) if n is None else min(n, len(ds))
        ids = np.random.default_rng(subset_seed).permutation(len(ds))[:count]
        xs, ys = zip(*(ds[int(i)] for i in ids))
        return DigitsSplit(torch.stack(xs), torch.tensor(ys))
    relative, label_key = CLEAN_TEST_SETS[name]
    path = data_root(root) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: unpack the python version of CIFAR "
                                "(https://www.cs.toronto.edu/~kriz/cifar.html) under the data root")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # noqa: S301 (the official CIFAR format is a pickle)
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key.encode()], dtype=np.int64)
    if n is not None:
        order = np.random.default_rng(subset_seed).permutation(len(labels))[:n] if subset_seed else np.arange(min(n, len(labels)))
        images, labels = images[order], labels[order]
    return DigitsSplit(torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0), torch.from_numpy(labels))


def build_stream(dataset: str, domains: Sequence[tuple[str, int]], *, batch_size: int, order: str = "shuffled",
                 rounds: int = 1, seed: int = 0, n_per_domain: int | None = None, root: str | Path | None = None,
                 **digits_kw) -> Stream:
    """A test stream over ``domains`` from ``digits-c`` (quick) or a real benchmark (paper), same shape.

    For the real benchmarks ``n_per_domain`` keeps the first ``n`` images of each domain (CoTTA uses all
    10,000 per CIFAR corruption; Tent's ImageNet-C runs use 5,000); the domain ``("clean", 0)`` is the
    clean test set (:func:`load_clean`), as in digits-c.
    """
    if dataset == "digits-c":
        return digits_c.make_stream(domains, batch_size=batch_size, order=order, rounds=rounds, seed=seed,
                                    samples_per_domain=n_per_domain, **digits_kw)
    if dataset not in BENCHMARKS:
        raise ValueError(f"unknown dataset {dataset!r}: allowed are {', '.join(DATASETS)}")
    rng = np.random.default_rng([seed, 7919])
    stream = Stream(f"{dataset}-stream")
    for _ in range(rounds):
        for corruption, severity in domains:
            if corruption == "clean":
                data = load_clean(dataset, root, n_per_domain)
            elif dataset == "imagenetc":
                data = load_imagenet_c(corruption, severity, root, n_per_domain)
            else:
                data = load_cifar_c(dataset, corruption, severity, root, n_per_domain)
            idx = _order(data.y, order, rng, 0.1, batch_size)
            for start in range(0, len(idx), batch_size):
                ids = idx[start:start + batch_size]
                stream.batches.append(Batch(data.x[ids], data.y[ids], corruption, severity))
    return stream
