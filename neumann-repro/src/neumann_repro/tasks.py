"""Data sets and models of the small-scale reproduction. Nothing is downloaded.

- MNIST-1D generated offline with ``mnist1d.data.make_dataset`` ("mnist1d-4k": 4,000 training
  examples, the library's default; "mnist1d-36k": 40,000; "mnist1d-80k": 80,000; before the
  validation split), cached as ``.npz`` under the output directory.
- CIFAR-10 read from a user-given directory in its standard python-pickle format
  (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

The last 10% of every training set is held out as a validation split: learning rates are tuned
on it, test errors are reported on the test split.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

MNIST1D_SIZES = {"mnist1d-4k": 5_000, "mnist1d-36k": 50_000, "mnist1d-80k": 100_000}  # 80% of samples are for training


@dataclass
class Dataset:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, classes: int) -> Dataset:
    n_val = len(x) // 10
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Dataset(name, f(x[:-n_val]), i(y[:-n_val]), f(x[-n_val:]), i(y[-n_val:]), f(xt), i(yt), classes)


def load_mnist1d(name: str, cache_dir: Path) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.npz"
    if not path.exists():
        args = get_dataset_args()
        args.num_samples = MNIST1D_SIZES[name]
        d = make_dataset(args)  # generated locally, never get_dataset (which downloads)
        # a private temporary name: concurrent workers and processes may generate the same set at once;
        # each writes its own file and the atomic rename makes one of them the cache
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=cache_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    z = np.load(path)
    # channel axis for the CNN; the MLP flattens
    return _split(name, z["x"][:, None, :], z["y"], z["x_test"][:, None, :], z["y_test"], 10)


CIFAR10_FILES = (*(f"data_batch_{k}" for k in range(1, 6)), "test_batch")


def _cifar10_root(data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    return data_dir / "cifar-10-batches-py" if (data_dir / "cifar-10-batches-py").is_dir() else data_dir


def cifar10_missing(data_dir: Path) -> str:
    """'' if ``data_dir`` holds the CIFAR-10 python batches, else what is missing."""
    root = _cifar10_root(data_dir)
    if not root.is_dir():
        return f"{data_dir} is not a directory"
    missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
    return f"missing {', '.join(missing)} in {root}" if missing else ""


def load_cifar10(data_dir: Path) -> Dataset:
    """CIFAR-10 from the python-pickle batches in ``data_dir`` (as distributed by its authors)."""
    data_dir = _cifar10_root(data_dir)

    def read(fname: str) -> tuple[np.ndarray, np.ndarray]:
        path = data_dir / fname
        if not path.exists():
            raise FileNotFoundError(f"CIFAR-10 batch {path} not found (python-pickle format expected)")
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(f"data_batch_{k}") for k in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = read("test_batch")
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return _split("cifar10", (x - mean) / std, y, (xt - mean) / std, yt, 10)


def load_task(name: str, cache_dir: Path, data_dir: Path | None = None) -> Dataset:
    if name in MNIST1D_SIZES:
        return load_mnist1d(name, cache_dir)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("the cifar10 task needs --data-dir (CIFAR-10 is never downloaded)")
        return load_cifar10(data_dir)
    raise ValueError(f"unknown task {name!r}; choose from {[*MNIST1D_SIZES, 'cifar10']}")


class MLP(nn.Module):
    def __init__(self, in_features: int, classes: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, c: int, conv: type[nn.Module], bn: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(c, c, 3, padding=1, bias=False), bn(c), nn.ReLU(), conv(c, c, 3, padding=1, bias=False), bn(c)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class ResNetSmall(nn.Module):
    """A small ResNet-style CNN with BatchNorm (1D for MNIST-1D, 2D for CIFAR-10)."""

    def __init__(self, in_channels: int, classes: int, dims: int = 1, width: int = 32) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        pool = nn.AdaptiveAvgPool1d if dims == 1 else nn.AdaptiveAvgPool2d
        self.net = nn.Sequential(
            conv(in_channels, width, 5 if dims == 1 else 3, padding=2 if dims == 1 else 1, bias=False),
            bn(width),
            nn.ReLU(),
            _Block(width, conv, bn),
            (nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(2),
            _Block(width, conv, bn),
            pool(1),
            nn.Flatten(),
            nn.Linear(width, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GRUClassifier(nn.Module):
    """A GRU reading a 1-D signal one sample per time step (as in MNIST-1D's own benchmarks); the
    last hidden state feeds a linear classifier."""

    def __init__(self, channels: int, classes: int, width: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(channels, width, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x.transpose(1, 2))  # (N, C, L) -> (N, L, C)
        return self.head(h[-1])


class _PreNormBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """A small pre-norm transformer encoder over patches of a 1-D signal (``patch`` samples per
    token, a learned position embedding, LayerNorm, no dropout), mean-pooled into a classifier."""

    def __init__(
        self, channels: int, length: int, classes: int, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 4
    ) -> None:
        super().__init__()
        if length % patch:
            raise ValueError(f"the signal length {length} is not a multiple of the patch size {patch}")
        self.patch = patch
        self.embed = nn.Linear(channels * patch, width)
        self.pos = nn.Parameter(torch.zeros(1, length // patch, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(_PreNormBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        n, c, length = x.shape
        tokens = (
            x.reshape(n, c, length // self.patch, self.patch).permute(0, 2, 1, 3).reshape(n, length // self.patch, -1)
        )
        h = self.blocks(self.embed(tokens) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


MODELS = ("mlp", "cnn", "gru", "transformer")


def make_model(name: str, data: Dataset, width: int | None = None) -> nn.Module:
    """``mlp`` (two hidden layers, ``width`` 256 by default), ``cnn`` (a small ResNet with
    BatchNorm, ``width`` 32 channels), ``gru`` (``width`` 64 hidden units) or ``transformer``
    (``width`` 64, two pre-norm layers over patches of 4 samples)."""
    shape = data.input_shape
    if name == "mlp":
        return MLP(int(np.prod(shape)), data.num_classes, width=width or 256)
    if name == "cnn":
        return ResNetSmall(shape[0], data.num_classes, dims=len(shape) - 1, width=width or 32)
    if len(shape) == 2 and name == "gru":
        return GRUClassifier(shape[0], data.num_classes, width=width or 64)
    if len(shape) == 2 and name == "transformer":
        return PatchTransformer(shape[0], shape[1], data.num_classes, width=width or 64)
    raise ValueError(f"unknown model {name!r} for input shape {shape}; choose from {MODELS} (gru, transformer: 1-D)")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
