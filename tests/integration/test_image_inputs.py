"""Image inputs end to end: a directory of JPEG and PNG files, and a Parquet column of image
paths, scored by real worker processes on the embedded default and on Redis + PostgreSQL.
The workers' predictions must be those of the same model run in this process on images
prepared by hand with Pillow and NumPy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ml_framework.manifest import ModelRepository
from ml_framework.store import JobState

pytestmark = pytest.mark.integration
TIMEOUT_S = 240
MODEL = "tiny-image"
N_FILES = 50
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
PREPROCESSING = {"resize": 32, "crop": 32, "scale": 1 / 255, "mean": MEAN, "std": STD}


@pytest.fixture(scope="module")
def image_model(trained):
    """A Linear layer on 3x32x32 images, published once for both backends (the session's
    model repository: the workers load it on first use)."""
    import torch

    from worker.export import export_torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)).eval()
    if not ModelRepository(trained[0]).versions(MODEL):
        export_torch(model, trained[0], MODEL, inputs={"kind": "image", "columns": ["path"]},
                     outputs={"kind": "embedding", "size": 4}, preprocessing=PREPROCESSING)
    return model


@pytest.fixture(scope="module")
def image_dir(data_dir):
    """``images/`` under the data directory: 40 JPEGs and 10 PNGs of varied sizes (none
    twice the target, so none is decoded at reduced scale), in path order."""
    directory = data_dir / "images"
    directory.mkdir(exist_ok=True)
    rng = np.random.default_rng(14)
    names = []
    for i in range(N_FILES):
        width, height = 32 + int(rng.integers(0, 30)), 32 + int(rng.integers(0, 30))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        name = f"img{i:03d}.jpg" if i < 40 else f"img{i:03d}.png"
        Image.fromarray(pixels).save(directory / name, **({"quality": 90} if name.endswith(".jpg") else {}))
        names.append(name)
    return directory, sorted(names)


def by_hand(path) -> np.ndarray:
    """(3, 32, 32) float32: shorter side to 32, centre crop 32, 1/255, ImageNet mean/std."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    im = im.resize((32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32), Image.Resampling.BILINEAR)
    left, top = round((im.size[0] - 32) / 2), round((im.size[1] - 32) / 2)
    pixels = np.asarray(im.crop((left, top, left + 32, top + 32)), dtype=np.float64) / 255
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def expected(model, paths) -> np.ndarray:
    """(N, 4) outputs of ``model`` in this process on the hand-prepared images."""
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(np.stack([by_hand(p) for p in paths]))).numpy()


def test_a_directory_of_images_scores_like_the_model_in_process(backend, image_model, image_dir):
    """Every file of the directory is one row, in path order, with the outputs of the same
    model on the same images prepared by hand."""
    directory, names = image_dir
    job = backend.client.score_dataset(directory, MODEL, batch_size=16)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert status.state is JobState.SUCCEEDED, status
    results = job.results()
    assert list(results.index) == list(range(N_FILES))
    np.testing.assert_allclose(np.stack(results["embedding"].to_numpy()),
                               expected(image_model, [directory / n for n in names]), atol=1e-4)


def test_bad_images_in_a_path_column_fail_only_their_rows(backend, image_model, image_dir, data_dir):
    """In a Parquet column of paths, a corrupt file, a missing file and a path leaving the
    data directory each fail their own row, naming the row, the field and the path as
    given (never the server's absolute path); the other rows score."""
    _, names = image_dir
    (data_dir / "corrupt.jpg").write_bytes(b"no image in here\n" * 10)
    paths = [f"images/{n}" for n in names[:6]]
    paths[1], paths[3], paths[4] = "corrupt.jpg", "images/missing.png", "../outside.png"
    table = pa.table({"path": paths})
    pq.write_table(table, data_dir / "image_paths.parquet")
    job = backend.client.score_dataset(data_dir / "image_paths.parquet", MODEL)
    status = job.wait(timeout_s=TIMEOUT_S)
    assert (status.state, status.rows_ok, status.rows_failed) == (JobState.PARTIAL, 3, 3)
    results = job.results()
    errors = results["error"].dropna()
    assert errors.to_dict() == {
        1: "row 1, field 'path': image 'corrupt.jpg': not an image file Pillow can read (corrupt, or another kind "
           "of file)",
        3: "row 3, field 'path': image 'images/missing.png': not found in the data directory",
        4: "row 4, field 'path': image '../outside.png': leaves the data directory; refused without reading it",
    }
    assert not any(str(data_dir) in e for e in errors)
    good = [0, 2, 5]
    np.testing.assert_allclose(np.stack(results["embedding"][good].to_numpy()),
                               expected(image_model, [data_dir / paths[i] for i in good]), atol=1e-4)


def test_image_paths_in_memory_and_online(backend, image_model, image_dir):
    """score_rows and predict take image paths relative to the data directory."""
    directory, names = image_dir
    paths = [f"images/{n}" for n in names[-5:]]
    want = expected(image_model, [directory / n for n in names[-5:]])
    job = backend.client.score_rows(paths, MODEL)
    assert job.wait(timeout_s=TIMEOUT_S).state is JobState.SUCCEEDED
    np.testing.assert_allclose(np.stack(job.results()["embedding"].to_numpy()), want, atol=1e-4)
    answer = backend.client.predict(MODEL, paths[:2], timeout_s=60)
    np.testing.assert_allclose(np.stack(answer["embedding"].to_numpy()), want[:2], atol=1e-4)


def test_mlf_score_writes_an_image_folder_to_parquet(backend, image_model, image_dir, tmp_path):
    """The README's command: `mlf score <folder> -m <model> -o out.parquet` writes one row
    per image with the model's outputs."""
    directory, names = image_dir
    out = tmp_path / "scores.parquet"
    done = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", "score", str(directory),
                           "-m", MODEL, "-o", str(out),
                           "--timeout", str(TIMEOUT_S)], env=backend.env, capture_output=True, text=True,
                          timeout=TIMEOUT_S + 60)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.num_rows == N_FILES
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                               expected(image_model, [directory / n for n in names]), atol=1e-4)
