"""Stage `prepare`: get the images and split them into train, validation and test sets.

data.source: mnist downloads the real MNIST (numpy + urllib only, every file
checked against its checksum; mirrors and checksums in src/mnist_download.yaml);
data.source: digits uses
scikit-learn's bundled 8x8 digits, scaled to 28x28, with no network at all.
Writes data/prepared/data.npz: x_train, y_train, x_val, y_val, x_test, y_test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import PREPARED, load_params  # noqa: E402

RAW = Path("data/raw")
# Where MNIST comes from: configuration, not a parameter (and not a dependency: the
# data is the same from every mirror, each file checked against its checksum).
DOWNLOAD = Path(__file__).parent / "mnist_download.yaml"
# What the entries of its files are, in order.
MNIST_FILES = ("train_images", "train_labels", "test_images", "test_labels")
OFFLINE_HINT = ("Offline? Use scikit-learn's bundled digits instead: "
                "dvc exp run -S data.source=digits (or scaffold with --set data.source=digits).")


class PrepareError(Exception):
    """A problem the person running the pipeline can fix; printed as one line."""


def checksum_matches(data: bytes, spec: dict) -> tuple[bool, str]:
    """Check ``data`` against the sha256 or md5 in ``spec``; returns (ok, what was found)."""
    for algorithm in ("sha256", "md5"):
        if spec.get(algorithm):
            got = hashlib.new(algorithm, data).hexdigest()
            return got == str(spec[algorithm]).lower(), f"{algorithm} {got}"
    raise PrepareError(f"the {DOWNLOAD.name} files entry for {spec.get('name')} has no md5 or sha256.")


def fetch(spec: dict, mirrors: list[str], timeout: float) -> bytes:
    """One file's bytes: from data/raw if it is already there and intact, else from the first good mirror."""
    name = spec["name"]
    cached = RAW / name
    if cached.is_file():
        data = cached.read_bytes()
        if checksum_matches(data, spec)[0]:
            return data
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except Exception as exc:  # any network or HTTP failure: try the next mirror
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url}: {reason}")
            continue
        ok, got = checksum_matches(data, spec)
        if not ok:
            failures.append(f"{url}: checksum mismatch (got {got})")
            continue
        RAW.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(cached)
        print(f"downloaded {url}")
        return data
    tried = "; ".join(failures) or f"no mirrors in {DOWNLOAD.name}"
    raise PrepareError(f"could not download MNIST file {name} ({tried}). {OFFLINE_HINT}")


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An idx file (gzip-compressed) as a uint8 array: images N x rows x cols, or labels N."""
    raw = gzip.decompress(data)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise PrepareError(f"{name} is not an idx file of unsigned bytes.")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise PrepareError(f"{name} is truncated: expected {np.prod(shape)} values, got {array.size}.")
    return array.reshape(shape)


def load_mnist(params: dict) -> dict[str, np.ndarray]:
    cfg = yaml.safe_load(DOWNLOAD.read_text())
    files = cfg["files"]
    if len(files) != len(MNIST_FILES) or not all(isinstance(f, dict) and f.get("name") for f in files):
        raise PrepareError(f"files in {DOWNLOAD.name} must list 4 files ({{name: ..., md5: ...}}): "
                           "training images, training labels, test images, test labels.")
    arrays = {key: parse_idx(fetch(spec, cfg["mirrors"], cfg["timeout"]), spec["name"])
              for key, spec in zip(MNIST_FILES, files)}
    x_train, y_train = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    x_test, y_test = arrays["test_images"], arrays["test_labels"].astype(np.int64)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise PrepareError("MNIST images and labels differ in number.")
    # Hold out a random share of the training images for validation.
    order = np.random.default_rng(params["seed"]).permutation(len(x_train))
    n_val = int(round(len(x_train) * params["val_fraction"]))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x_train[train], "y_train": y_train[train],
            "x_val": x_train[val], "y_val": y_train[val],
            "x_test": x_test, "y_test": y_test}


def load_digits(params: dict) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 8x8 pixels of 0..16 -> 24x24 of 0..255 (each pixel a 3x3 block), padded to
    # 28x28 with a dark border as MNIST's digits are.
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.kron(images, np.ones((1, 3, 3), dtype=np.uint8))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    labels = digits.target.astype(np.int64)
    seed = params["seed"]
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=params["test_fraction"], random_state=seed, stratify=labels)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=params["val_fraction"], random_state=seed, stratify=y_rest)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
            "x_test": x_test, "y_test": y_test}


def main() -> int:
    params = load_params("data")
    source = params["source"]
    loaders = {"mnist": load_mnist, "digits": load_digits}
    try:
        if source not in loaders:
            raise PrepareError(f"unknown data.source '{source}': use mnist or digits.")
        arrays = loaders[source](params)
    except PrepareError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    PREPARED.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PREPARED, **arrays)
    sizes = {split: len(arrays[f"y_{split}"]) for split in ("train", "val", "test")}
    (PREPARED.parent / "info.json").write_text(json.dumps({"source": source, **sizes}, indent=2) + "\n")
    print(f"prepared {source}: " + ", ".join(f"{n} {split}" for split, n in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
