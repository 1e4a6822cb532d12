"""Shared session fixtures: tiny prepared datasets, each made once per test session by data_prep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FMNIST_ROOTS = ("/usr/share/datasets/fashion-mnist", str(Path(__file__).resolve().parents[1] / ".." / "shared" /
                                                          "data" / "fashion-mnist"))


def _prepare(source, out: Path, write_mode: str) -> Path:
    from data_prep.pipeline import PrepOptions, prepare

    prepare(source, out, PrepOptions(settings=source.settings, shard_size=1000, workers=2, write_mode=write_mode))
    return out


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """SYNTHETIC ImageNet-LT-shaped JPEGs (~500x375 generated, stored at max side 256, q90, 'jpg' beton):
    6 classes with 16..2 training images (41) and 2 val images per class (12)."""
    from data_prep.sources import synthetic_dataset

    source = synthetic_dataset(scale=1.0, seed=0, val_per_class=2, histogram=np.array([16, 10, 6, 4, 3, 2]))
    return _prepare(source, tmp_path_factory.mktemp("synthetic_lt"), "jpg")


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """Real Fashion-MNIST-LT (IR 100, 28x28, raw-pixel beton), kept cheap: every 16th training image
    of the LT profile (~930), 5 val images per class, no test split."""
    from data_prep.sources import fmnist_dataset

    root = next((Path(r) for r in FMNIST_ROOTS if Path(r).is_dir()), None)
    if root is None:
        pytest.skip("Fashion-MNIST idx files not found")
    source = fmnist_dataset(root, 100, val_per_class=5, seed=0)
    source.splits.pop("test", None)
    train = source.splits["train"]
    train.keep = train.positions()[::16]
    return _prepare(source, tmp_path_factory.mktemp("fmnist_lt"), "raw")


@pytest.fixture
def free_port() -> int:
    """A free local TCP port for a multi-process launch (other jobs on the machine may hold 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
