"""Random access into prepared datasets: sample i's encoded JPEG bytes without scanning any tar.

Layout written by ``python -m data_prep`` (documented in README):
``DIR/manifest.json``, ``DIR/wds/<split>-NNNNN.{tar,idx}``, ``DIR/wds/<split>.index.npz`` (per sample:
label, shard, byte offset and size of its ``.jpg`` member) and ``DIR/ffcv/<split>.beton``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


class DatasetLayoutError(FileNotFoundError):
    """A prepared-dataset directory is missing a file or is inconsistent."""


class DataError(ValueError):
    """The prepared dataset does not fit the run's config (no such split, loader settings it cannot
    serve, ...); the message names the config key. The command line reports it in one line."""


def load_manifest(root: str | Path) -> dict:
    """Read ``DIR/manifest.json`` with a clear error when DIR is not a prepared dataset."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DatasetLayoutError(f"{path} not found: {root} is not a prepared dataset (run python -m data_prep)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"{path} is not valid JSON ({exc})") from exc


def index_path(root: str | Path, split: str) -> Path:
    return Path(root) / "wds" / f"{split}.index.npz"


def beton_path(root: str | Path, split: str) -> Path:
    return Path(root) / "ffcv" / f"{split}.beton"


class ShardReader:
    """Memory-mapped random access to one split's canonical JPEGs.

    Tars are mapped lazily per process, so a reader can be handed to forked or spawned workers.
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        manifest = load_manifest(self.root)
        if split not in manifest.get("splits", {}):
            raise DatasetLayoutError(f"{self.root}: no split {split!r} (has {sorted(manifest.get('splits', {}))})")
        self.num_classes = int(manifest["num_classes"])
        self.shard_files = [self.root / "wds" / name for name in manifest["splits"][split]["shards"]]
        ipath = index_path(self.root, split)
        if not ipath.exists():
            raise DatasetLayoutError(f"{ipath} missing: preparation of {split!r} did not finish")
        with np.load(ipath) as idx:
            self.labels = idx["label"].astype(np.int64)
            self.shard = idx["shard"].astype(np.int32)
            self.offset = idx["offset"].astype(np.int64)
            self.size = idx["size"].astype(np.int64)
        self._maps: list[np.memmap | None] = [None] * len(self.shard_files)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.shard_files)
        return state

    def _map(self, shard: int) -> np.memmap:
        mm = self._maps[shard]
        if mm is None:
            path = self.shard_files[shard]
            if not path.exists():
                raise DatasetLayoutError(f"shard {path} missing")
            mm = self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        return mm

    def get_bytes(self, i: int) -> np.ndarray:
        """Sample i's JPEG bytes as a zero-copy uint8 view."""
        if not 0 <= i < len(self.labels):
            raise IndexError(f"sample {i} out of range 0..{len(self.labels) - 1} in split {self.split!r}")
        off = self.offset[i]
        return self._map(int(self.shard[i]))[off: off + self.size[i]]
