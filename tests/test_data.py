import gzip
import shutil
import struct

import pytest
import torch

from advmnist.data import BUNDLED_DIR, FILES, load_file, load_mnist, parse_idx
from advmnist.errors import DataError


def idx_bytes(array: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + bytes(array.flatten().tolist())


def test_parse_idx_round_trip():
    t = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(parse_idx(idx_bytes(t)), t)


@pytest.mark.parametrize("raw, message", [
    (b"\x00\x00", "truncated"),
    (b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x02" + b"\x00\x00", "not an IDX file"),
    (b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02", "truncated inside the IDX header"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + b"\x01\x02", "truncated or padded"),
])
def test_parse_idx_rejects_bad_bytes(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw)


def test_bundled_mnist_loads_as_whole_tensors(mnist):
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.float32
    assert 0.0 == mnist.train_x.min().item() and mnist.train_x.max().item() == 1.0
    assert mnist.train_y.dtype == torch.int64
    assert torch.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(mnist.train_x.mean().item() - 0.1307) < 1e-3


def copy_bundle(dst, raw=False):
    for stem in FILES:
        src = BUNDLED_DIR / f"{stem}.gz"
        if raw:
            (dst / stem).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copy(src, dst / f"{stem}.gz")


def test_other_copy_raw_in_torchvision_layout(tmp_path, mnist):
    layout = tmp_path / "MNIST" / "raw"
    layout.mkdir(parents=True)
    copy_bundle(layout, raw=True)
    other = load_mnist(tmp_path)
    assert torch.equal(other.test_y, mnist.test_y) and other.checksum == mnist.checksum


def test_env_var_points_at_a_copy(tmp_path, monkeypatch):
    copy_bundle(tmp_path)
    monkeypatch.setenv("ADVMNIST_DATA", str(tmp_path))
    assert load_mnist().source == str(tmp_path)


def test_corrupt_byte_fails_the_checksum(tmp_path):
    copy_bundle(tmp_path, raw=True)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[100] = (data[100] + 1) % 10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: checksum mismatch"):
        load_mnist(tmp_path)


def test_truncated_gzip_names_the_file(tmp_path):
    copy_bundle(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot be read as gzip"):
        load_mnist(tmp_path)


def test_missing_file_and_missing_directory(tmp_path):
    copy_bundle(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing MNIST file t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_empty_directory_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="no MNIST files there and downloading failed"):
        load_mnist(tmp_path)


def test_load_file_checks_unknown_names_only_structurally(tmp_path):
    t = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    (tmp_path / "tiny.gz").write_bytes(gzip.compress(idx_bytes(t)))
    assert torch.equal(load_file(tmp_path / "tiny.gz"), t)
