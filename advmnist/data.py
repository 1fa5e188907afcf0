"""MNIST from IDX files into whole tensors, offline, with checksums.

The package carries the four original IDX files (re-compressed, see `mnist_data/README.md` for the
attribution: MNIST by LeCun, Cortes and Burges, CC BY-SA 3.0). A copy elsewhere is chosen with
`data_dir=` or the `ADVMNIST_DATA` environment variable; it may hold the files gzipped or raw, flat
or in torchvision's `MNIST/raw/` layout. Every file is checked against the MD5 of its decompressed
bytes (the well-known values of the original release), so any recompression is accepted and any
corruption is not.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

BUNDLED_DIR = Path(__file__).parent / "mnist_data"
ENV_VAR = "ADVMNIST_DATA"

#: MD5 of each decompressed IDX file and the shape it must have.
FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", (60000,)),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", (10000,)),
}

_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class MNIST:
    """The whole dataset as tensors: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    checksum: str  # MD5 over the four files' MD5s: names this exact data in records
    source: str  # the directory the files came from

    def to(self, device: torch.device | str) -> "MNIST":
        return MNIST(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                     self.test_y.to(device), self.checksum, self.source)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "MNIST":
        """The first n images of each split: the small slices tests and dry runs train on."""
        return MNIST(self.train_x[:n_train], self.train_y[:n_train], self.test_x[:n_test],
                     self.test_y[:n_test], self.checksum, self.source)


def parse_idx(raw: bytes, name: str = "IDX data") -> torch.Tensor:
    """Decode one uncompressed IDX file of unsigned bytes into a uint8 tensor."""
    if len(raw) < 4:
        raise DataError(f"{name}: truncated: {len(raw)} bytes, too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated inside the IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in shape:
        count *= d
    if len(raw) != header + count:
        raise DataError(f"{name}: truncated or padded: {len(raw) - header} data bytes for shape "
                        f"{tuple(shape)}, expected {count}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def _places(directory: Path) -> tuple[Path, ...]:
    """Where a copy may keep the files: flat, torchvision's MNIST/raw/ layout, or raw/."""
    return directory, directory / "MNIST" / "raw", directory / "raw"


def _find(directory: Path, stem: str) -> Path | None:
    for sub in _places(directory):
        for candidate in (sub / f"{stem}.gz", sub / stem):
            if candidate.is_file():
                return candidate
    return None


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'a file'}"
                        f" ({exc.__class__.__name__}: {exc}); the file is truncated or corrupt") from None
    return data


def load_file(path: str | os.PathLike, stem: str | None = None) -> torch.Tensor:
    """One IDX file (gzipped or raw), verified against the known MD5 when its name is known."""
    path = Path(path)
    stem = stem or path.name.removesuffix(".gz")
    raw = _read(path)
    if stem in FILES:
        md5, shape = FILES[stem]
        got = hashlib.md5(raw).hexdigest()
        if got != md5:
            raise DataError(f"{path}: checksum mismatch (md5 of decompressed bytes {got}, expected "
                            f"{md5}); the file is corrupt or not the original MNIST")
    tensor = parse_idx(raw, str(path))
    if stem in FILES and tuple(tensor.shape) != FILES[stem][1]:
        raise DataError(f"{path}: shape {tuple(tensor.shape)}, expected {FILES[stem][1]}")
    return tensor


def resolve_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read: the argument, else $ADVMNIST_DATA, else the bundled copy."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return BUNDLED_DIR


def _download(directory: Path) -> None:
    """Fetch MNIST with torchvision's downloader where no copy exists (needs the network)."""
    try:
        from torchvision.datasets import MNIST as TorchvisionMNIST

        TorchvisionMNIST(str(directory), train=True, download=True)
    except Exception as exc:  # network errors come in many types; all mean "no copy"
        raise DataError(f"{directory}: no MNIST files there and downloading failed "
                        f"({exc.__class__.__name__}); point --data-dir or ${ENV_VAR} at a copy") from None


def load_mnist(data_dir: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
               download: bool = True) -> MNIST:
    """Load and verify all four files; images become float32 in [0, 1] on `device`.

    With `download=False` (what the CLI passes: advmnist works offline) missing files are an error
    that lists them and the places looked in; with True, an empty directory is first filled by
    torchvision's downloader."""
    directory = resolve_dir(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist")
    paths = {stem: _find(directory, stem) for stem in FILES}
    if download and directory != BUNDLED_DIR and not any(paths.values()):
        _download(directory)
        paths = {stem: _find(directory, stem) for stem in FILES}
    missing = [stem for stem, p in paths.items() if p is None]
    if missing:
        places = ", ".join(str(p) for p in _places(directory))
        raise DataError(f"{directory}: missing MNIST file{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(looked for each, raw or .gz, in {places}); copy the IDX files there, or leave "
                        f"--data-dir and ${ENV_VAR} unset to use the copy shipped with advmnist")
    tensors = {stem: load_file(p, stem) for stem, p in paths.items()}
    checksum = hashlib.md5("".join(md5 for md5, _ in FILES.values()).encode()).hexdigest()

    def images(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).unsqueeze(1).float().div_(255)

    return MNIST(
        train_x=images(tensors["train-images-idx3-ubyte"]),
        train_y=tensors["train-labels-idx1-ubyte"].to(device).long(),
        test_x=images(tensors["t10k-images-idx3-ubyte"]),
        test_y=tensors["t10k-labels-idx1-ubyte"].to(device).long(),
        checksum=checksum,
        source=str(directory),
    )
