"""Image inputs (worker.inputs.image): decoding, resizing, cropping and normalising image
files with Pillow, checked against a hand computation with Pillow and NumPy, and the row
errors of bad files and paths."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ml_framework.errors import ManifestError
from ml_framework.manifest import ModelManifest
from worker.inputs import converter_for
from worker.inputs.image import ImageConverter

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def manifest(**prep) -> ModelManifest:
    """A torch image model's manifest with ``prep`` as its preprocessing."""
    return ModelManifest.model_validate({
        "name": "img", "version": 1, "framework": "torch", "artifact": "model.pt2",
        "inputs": {"kind": "image", "columns": ["path"]}, "outputs": {"kind": "embedding"},
        "preprocessing": prep})


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """``(height, width, 3)`` uint8 pixels: smooth gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def convert(converter: ImageConverter, paths: list, row_start: int = 0):
    return converter.convert(pa.table({"path": pa.array(paths, pa.string())}), ["path"], row_start)


@pytest.fixture()
def data_dir(tmp_path):
    """A data directory holding ``a.png`` (40 x 30, RGB) and ``b.png`` (30 x 50)."""
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(gradient(40, 30)).save(d / "a.png")
    Image.fromarray(gradient(30, 50, seed=1)).save(d / "sub" / "b.png")
    return d


def by_hand(path, resize: int, crop: int, mode: str = "RGB") -> np.ndarray:
    """Pillow + NumPy, step by step: shorter side to ``resize`` (torchvision's rule),
    centre crop ``crop``, (H, W, C) uint8."""
    im = Image.open(path).convert(mode)
    w, h = im.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = im.resize(size, Image.Resampling.BILINEAR)
    left, top = round((im.size[0] - crop) / 2), round((im.size[1] - crop) / 2)
    pixels = np.asarray(im.crop((left, top, left + crop, top + crop)))
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def test_resize_crop_and_normalise_match_a_hand_computation(data_dir):
    """Shorter side resized, centre-cropped, scaled by 1/255 and normalised per channel,
    laid out NCHW: the same numbers as Pillow and NumPy step by step."""
    conv = ImageConverter(manifest(resize=20, crop=16, scale=1 / 255, mean=MEAN, std=STD), data_dir, data_dir)
    out = convert(conv, ["a.png", "sub/b.png"], row_start=7)
    assert out.errors == [] and out.rows.tolist() == [7, 8] and out.n_rows == 2
    assert out.x.shape == (2, 3, 16, 16) and out.x.dtype == np.float32
    for i, name in enumerate(["a.png", "sub/b.png"]):
        want = (by_hand(data_dir / name, 20, 16) / 255.0 - np.array(MEAN)) / np.array(STD)
        np.testing.assert_allclose(out.x[i], want.transpose(2, 0, 1), atol=1e-5)


def test_nhwc_is_the_transpose_of_nchw(data_dir):
    """The same image laid out NHWC holds the NCHW values with channels last."""
    prep = {"resize": 24, "crop": 20, "scale": 1 / 255, "mean": MEAN, "std": STD}
    nchw = convert(ImageConverter(manifest(**prep), data_dir, data_dir), ["a.png"]).x
    nhwc = convert(ImageConverter(manifest(**prep, layout="NHWC"), data_dir, data_dir), ["a.png"]).x
    assert nchw.shape == (1, 3, 20, 20) and nhwc.shape == (1, 20, 20, 3)
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))


def test_greyscale_has_one_channel_of_pillows_luma(data_dir):
    """color L: one channel, Pillow's RGB -> L conversion, with scale and shift applied."""
    conv = ImageConverter(manifest(resize=[12, 18], color="L", scale=0.5, shift=-1.0), data_dir, data_dir)
    out = convert(conv, ["a.png"])
    want = np.asarray(Image.open(data_dir / "a.png").convert("L").resize((18, 12), Image.Resampling.BILINEAR))
    assert out.x.shape == (1, 1, 12, 18)
    np.testing.assert_allclose(out.x[0, 0], want * 0.5 - 1.0, atol=1e-6)


def test_a_png_with_alpha_drops_the_alpha_channel(data_dir):
    """An RGBA PNG is converted to RGB as torchvision's loader does: alpha dropped, not composited."""
    rgba = np.concatenate([gradient(16, 16), np.linspace(0, 255, 256).reshape(16, 16, 1).astype(np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(data_dir / "alpha.png")
    out = convert(ImageConverter(manifest(crop=16), data_dir, data_dir), ["alpha.png"])
    assert out.errors == [] and out.x.shape == (1, 3, 16, 16)
    np.testing.assert_array_equal(out.x[0], rgba[:, :, :3].transpose(2, 0, 1).astype(np.float32))


def test_bad_files_and_paths_fail_only_their_rows(data_dir, tmp_path):
    """A corrupt file, a missing file, a truncated JPEG, a path leaving the data directory
    (by '..' and by a symbolic link), a directory, a null and an image smaller than the
    crop each fail their own row, naming the row, the field and the path as given, never
    the worker's absolute path; the good rows are converted."""
    (data_dir / "corrupt.jpg").write_bytes(b"plain text, no image here\n" * 3)
    Image.fromarray(gradient(64, 64)).save(data_dir / "full.jpg", quality=90)
    (data_dir / "truncated.jpg").write_bytes((data_dir / "full.jpg").read_bytes()[:600])
    (tmp_path / "secret.png").write_bytes((data_dir / "a.png").read_bytes())
    os.symlink(tmp_path / "secret.png", data_dir / "link.png")
    Image.fromarray(gradient(10, 10)).save(data_dir / "small.png")
    paths = ["a.png", "corrupt.jpg", "missing.png", "truncated.jpg", "../secret.png", "link.png", "sub", None,
             "small.png", "sub/b.png"]
    out = convert(ImageConverter(manifest(crop=16), data_dir, data_dir), paths, row_start=100)
    assert out.rows.tolist() == [100, 109] and out.n_rows == 10
    messages = {e.row_index: e.message for e in out.errors}
    assert {e.field for e in out.errors} == {"path"}
    assert messages[101] == ("row 101, field 'path': image 'corrupt.jpg': not an image file Pillow can read "
                             "(corrupt, or another kind of file)")
    assert messages[102] == "row 102, field 'path': image 'missing.png': not found in the data directory"
    assert messages[103].startswith("row 103, field 'path': image 'truncated.jpg': cannot be decoded: ")
    assert messages[104] == ("row 104, field 'path': image '../secret.png': leaves the data directory; "
                             "refused without reading it")
    assert messages[105] == ("row 105, field 'path': image 'link.png': leaves the data directory; "
                             "refused without reading it")
    assert messages[106] == "row 106, field 'path': image 'sub': a directory, not an image file"
    assert messages[107] == "row 107, field 'path': missing image path (null)"
    assert messages[108] == ("row 108, field 'path': image 'small.png': 10x10 (width x height) after resizing, "
                             "smaller than the crop 16x16")
    assert not any(str(tmp_path) in m for m in messages.values())
    assert out.x.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(out.x[1], by_hand(data_dir / "sub/b.png", 30, 16).transpose(2, 0, 1))


def test_large_jpegs_decoded_at_reduced_scale_stay_close_to_a_full_decode(data_dir):
    """A JPEG four times the target is decoded with Pillow's draft; the prepared pixels
    stay within a few levels of a full decode followed by the same resize and crop."""
    Image.fromarray(gradient(512, 384, seed=3)).save(data_dir / "big.jpg", quality=95)
    out = convert(ImageConverter(manifest(resize=96, crop=96), data_dir, data_dir), ["big.jpg"])
    full = by_hand(data_dir / "big.jpg", 96, 96).transpose(2, 0, 1).astype(np.float32)
    assert out.x.shape == (1, 3, 96, 96)
    assert np.abs(out.x[0] - full).mean() < 2.0


def test_many_threads_give_the_rows_of_one_thread(data_dir):
    """Rows decoded on a pool of threads land in their own places: the same batch as
    decoding them one by one."""
    for i in range(12):
        Image.fromarray(gradient(20 + i, 30, seed=i)).save(data_dir / f"r{i}.png")
    paths = [f"r{i}.png" for i in range(12)]
    prep = {"resize": 20, "crop": 20, "scale": 1 / 255}
    one = convert(ImageConverter(manifest(**prep), data_dir, data_dir, threads=1), paths)
    many = convert(converter_for(manifest(**prep), data_dir, data_dir, threads=4), paths)
    assert one.rows.tolist() == many.rows.tolist() == list(range(12))
    np.testing.assert_array_equal(one.x, many.x)
    assert len({float(r.sum()) for r in many.x}) == 12


def test_manifests_without_a_fixed_size_or_with_a_crop_past_the_resize_are_refused(tmp_path):
    """Image models declare a fixed prepared size, and a crop no larger than the resize."""
    with pytest.raises(ValueError, match="needs a fixed image size"):
        manifest(resize=32)
    with pytest.raises(ValueError, match=r"preprocessing.crop 40 is larger than preprocessing.resize 32"):
        manifest(resize=32, crop=40)
    m = manifest(resize=32, crop=28, layout="NHWC", color="L")
    assert m.row_shape == (28, 28, 1)
    m.write(tmp_path)
    assert ModelManifest.read(tmp_path / "manifest.yaml") == m
    (tmp_path / "manifest.yaml").write_text((tmp_path / "manifest.yaml").read_text().replace("crop: 28", "crop: 33"))
    with pytest.raises(ManifestError, match="larger than preprocessing.resize"):
        ModelManifest.read(tmp_path / "manifest.yaml")


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(data_dir):
    """A 16-bit greyscale PNG (a 0-65535 gradient) arrives as its 8-bit equivalent,
    ``round(v * 255 / 65535)``: Pillow's own ``convert`` clips every value above 255,
    which turned such an image nearly white (found by the break-it review)."""
    values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.frombytes("I;16", (64, 8), values.astype("<u2").tobytes()).save(data_dir / "g16.png")
    converter = ImageConverter(manifest(resize=[8, 64], color="L", scale=1 / 255), data_dir, data_dir, threads=1)
    out = convert(converter, ["g16.png"])
    assert not out.errors
    want = (values.astype(np.int64) * 255 + 32767) // 65535 / 255
    np.testing.assert_allclose(out.x[0, 0], want.astype(np.float32), atol=1e-6)
    assert 0.45 < out.x.mean() < 0.55


def test_images_too_big_as_stored_or_once_resized_fail_their_rows_before_decoding(data_dir, monkeypatch):
    """A 1 x 60,000 PNG is a few hundred bytes, but resized to 224 on its shorter side it
    would be 224 x 13,440,000 pixels (3 GB: the break-it review saw a worker reach 4.5 GB
    and fail); it fails its row instead, naming the sizes, and so does an image with more
    pixels than :data:`MAX_PIXELS` as stored. The other rows score."""
    import worker.inputs.image as image_module

    Image.fromarray(np.zeros((60_000, 1), np.uint8)).save(data_dir / "thin.png")
    converter = ImageConverter(manifest(resize=224, crop=224), data_dir, data_dir, threads=1)
    out = convert(converter, ["a.png", "thin.png"])
    assert list(out.rows) == [0]
    assert out.errors[0].message == (
        "row 1, field 'path': image 'thin.png': 1x60000 (width x height) would be resized to 224x13440000, more "
        f"than the {image_module.MAX_PIXELS:,} pixels a worker prepares (its sides are too unequal for this resize)")

    monkeypatch.setattr(image_module, "MAX_PIXELS", 30 * 50 - 1)  # a.png is 40 x 30, sub/b.png 30 x 50
    converter = ImageConverter(manifest(crop=30), data_dir, data_dir, threads=1)
    out = convert(converter, ["a.png", "sub/b.png"])
    assert list(out.rows) == [0]
    assert out.errors[0].message == ("row 1, field 'path': image 'sub/b.png': 30x50 (width x height) is 1,500 "
                                     "pixels, more than the 1,499 a worker decodes")


def test_s3_images_are_read_through_the_settings_the_converter_was_built_with(data_dir, tmp_path, monkeypatch):
    """An s3:// image went through get_settings() (the process global), not the worker's
    settings: a converter built with another s3 endpoint reads from that one, and the
    worker's context hands its settings through the registry to every converter."""
    import pyarrow.fs as pafs

    import worker.inputs.image as image_module
    from ml_framework.settings import load_settings
    from worker.process import WorkerContext

    stores = {url: tmp_path / name for name, url in (("own", "http://own-s3:8333"), ("global", "http://global-s3:8333"))}
    for root in stores.values():  # each a directory standing for the object store at that endpoint
        (root / "bucket").mkdir(parents=True)
    (data_dir / "a.png").rename(stores["http://own-s3:8333"] / "bucket" / "a.png")
    monkeypatch.setattr(image_module, "filesystem", lambda settings: pafs.SubTreeFileSystem(
        str(stores[settings.s3_endpoint_url]), pafs.LocalFileSystem()))
    monkeypatch.setattr(image_module, "get_settings", lambda: load_settings(s3_endpoint_url="http://global-s3:8333"))
    own = load_settings(s3_endpoint_url="http://own-s3:8333", models_dir=tmp_path / "models", data_dir=data_dir)

    out = convert(converter_for(manifest(resize=20, crop=16), data_dir, data_dir, threads=1, settings=own),
                  ["s3://bucket/a.png"])
    assert out.errors == [] and out.x.shape == (1, 3, 16, 16)

    import worker.registry as registry_module

    built = []

    def spy(*args, **kwargs):
        built.append(converter_for(*args, **kwargs))
        raise RuntimeError("converter built; no runtime needed")

    (tmp_path / "models" / "img" / "1").mkdir(parents=True)
    manifest(resize=20, crop=16).write(tmp_path / "models" / "img" / "1")
    monkeypatch.setattr(registry_module, "check_artifact", lambda *_: None)
    monkeypatch.setattr(registry_module, "converter_for", spy)
    with pytest.raises(RuntimeError, match="converter built"):
        WorkerContext(own).registry.get("img")
    assert built[0].settings is own
