"""The one rule for dataset paths (ml_framework/paths.py): inside the data directory after
every symbolic link, or refused unread when the path enters it and leads out; files named
outside it stay the producer's to inline."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path, PurePosixPath

import pytest

from ml_framework.errors import DatasetPathError
from ml_framework.paths import locate_dataset, resolve_under


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """``data/`` with a file, a subdirectory and links in and out; ``outside/`` beside it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (data / "in.csv").write_text("a\n1\n")
    (data / "sub" / "deep.csv").write_text("a\n1\n")
    (outside / "secret.csv").write_text("a\nSECRET\n")
    (data / "in_link.csv").symlink_to(data / "sub" / "deep.csv")
    (data / "relative_in.csv").symlink_to("sub/deep.csv")
    (data / "out_link.csv").symlink_to(outside / "secret.csv")
    (data / "relative_out.csv").symlink_to("../outside/secret.csv")
    (data / "sub" / "up").symlink_to(tmp_path)
    (outside / "to_data_link.csv").symlink_to(data / "out_link.csv")
    return {"root": tmp_path, "data": data, "outside": outside}


def test_files_inside_resolve_to_their_real_path_relative_to_the_data_directory(tree):
    """A file, a link to a file inside (absolute or relative), and a data-relative path."""
    data = tree["data"]
    assert locate_dataset(data, data / "in.csv").relative == PurePosixPath("in.csv")
    for name in ("in_link.csv", "relative_in.csv"):
        located = locate_dataset(data, data / name)
        assert located.relative == PurePosixPath("sub/deep.csv") and located.path == data / "sub" / "deep.csv"
    assert resolve_under(data, "sub/deep.csv") == data / "sub" / "deep.csv"
    assert resolve_under(data, "sub/../in.csv") == data / "in.csv"


@pytest.mark.parametrize("name", ["out_link.csv", "relative_out.csv", "sub/up/outside/secret.csv",
                                  "../outside/secret.csv", "sub/../../outside/secret.csv"])
def test_a_path_entering_the_data_directory_and_leading_out_is_refused(tree, name):
    """Through a symlink (absolute or relative target, the file or a directory on the way)
    or '..': refused for producers too, naming the path as given, never the target."""
    with pytest.raises(DatasetPathError, match="leaves the data directory") as caught:
        resolve_under(tree["data"], name)
    assert "secret" not in str(caught.value).replace(name, "") and str(tree["outside"]) not in str(caught.value)
    if ".." not in name:  # written under the data directory (no '..' taking it out): producers refuse it too
        with pytest.raises(DatasetPathError, match="leaves the data directory"):
            locate_dataset(tree["data"], tree["data"] / name)


def test_a_file_named_outside_stays_the_producers_to_inline(tree):
    """Named directly outside the data directory (even as data/../x): the CLI and the client
    may read it; the API and the worker refuse it."""
    for path in (tree["outside"] / "secret.csv", tree["data"] / ".." / "outside" / "secret.csv"):
        assert locate_dataset(tree["data"], path).relative is None
        with pytest.raises(DatasetPathError):
            resolve_under(tree["data"], path)


def test_a_link_outside_that_passes_through_the_data_directory_is_refused(tree):
    """outside/to_data_link.csv -> data/out_link.csv -> outside/secret.csv: the chain enters
    the data directory and leaves it again."""
    with pytest.raises(DatasetPathError):
        locate_dataset(tree["data"], tree["outside"] / "to_data_link.csv")


def test_a_data_directory_that_is_itself_a_link_works_both_ways(tree):
    """data_dir given as a symlink to the real directory: files inside resolve, links out are refused."""
    alias = tree["root"] / "alias"
    alias.symlink_to(tree["data"])
    assert resolve_under(alias, "in.csv") == tree["data"] / "in.csv"
    assert locate_dataset(alias, tree["data"] / "in.csv").relative == PurePosixPath("in.csv")
    with pytest.raises(DatasetPathError):
        locate_dataset(alias, alias / "out_link.csv")


def test_link_loops_are_refused(tree):
    (tree["data"] / "loop_a").symlink_to(tree["data"] / "loop_b")
    (tree["data"] / "loop_b").symlink_to(tree["data"] / "loop_a")
    with pytest.raises(DatasetPathError, match="too many levels"):
        resolve_under(tree["data"], "loop_a")


def test_missing_files_resolve_so_that_the_reader_can_say_they_are_missing(tree):
    assert resolve_under(tree["data"], "nope/x.csv") == tree["data"] / "nope" / "x.csv"


def test_nothing_is_opened_to_decide(tree):
    """The target is a FIFO: opening it for reading would wake the writer thread. Neither
    a refused path nor an admitted one opens it."""
    fifo = tree["outside"] / "pipe.csv"
    os.mkfifo(fifo)
    (tree["data"] / "pipe_link.csv").symlink_to(fifo)
    os.mkfifo(tree["data"] / "inside_pipe.csv")
    opened = threading.Event()

    def writer(path: Path) -> None:
        with contextlib.suppress(BrokenPipeError), open(path, "w") as f:  # blocks until a reader opens it
            opened.set()
            f.write("a\n")

    threads = [threading.Thread(target=writer, args=(p,), daemon=True) for p in (fifo, tree["data"] / "inside_pipe.csv")]
    for t in threads:
        t.start()
    with pytest.raises(DatasetPathError):
        locate_dataset(tree["data"], tree["data"] / "pipe_link.csv")
    assert resolve_under(tree["data"], "inside_pipe.csv") == tree["data"] / "inside_pipe.csv"
    assert not opened.wait(0.2)
    for p in (fifo, tree["data"] / "inside_pipe.csv"):  # release the writers
        os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
    for t in threads:
        t.join(5)


@pytest.mark.parametrize("path", ["a\x00b.csv", "sub/\x00"])
def test_a_nul_character_in_a_path_is_a_dataset_path_error(tmp_path, path):
    """A NUL byte (which the HTTP API's schema test generated) is refused as a path
    error, not a ValueError from ``os.lstat`` that became a 500."""
    with pytest.raises(DatasetPathError, match="NUL character"):
        locate_dataset(tmp_path, path)
    with pytest.raises(DatasetPathError, match="NUL character"):
        resolve_under(tmp_path, path)
