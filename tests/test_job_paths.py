"""Local paths on the command line: made absolute where the command was typed, and a clear error
inside a Ray job's temporary copy of its uploaded working dir (`ray job submit --working-dir .`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptxray.cli import absolute_local_paths, job_working_dir_copy, main
from ptxray.config import ConfigError, load_config


@pytest.fixture
def job_copy(tmp_path, monkeypatch) -> Path:
    """The current directory as Ray lays out a job's uploaded working dir."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "jobs").mkdir(parents=True)
    (copy / "jobs" / "kfold.py").write_text("# uploaded\n")
    monkeypatch.chdir(copy)
    return copy


def test_outside_a_job_relative_paths_become_absolute_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert job_working_dir_copy() is None
    got = absolute_local_paths(
        {"--images": "demo-data/siim", "--cache": "cache", "--labels": "s3://bucket/train-rle.csv", "--out": ""},
        outputs=["--cache"],
    )
    assert got == {"--images": str(tmp_path / "demo-data/siim"), "--cache": str(tmp_path / "cache"),
                   "--labels": "s3://bucket/train-rle.csv", "--out": ""}  # fmt: skip


def test_in_a_job_copy_a_missing_relative_input_is_an_error_that_names_the_fix(job_copy):
    assert job_working_dir_copy() == job_copy
    with pytest.raises(ConfigError) as e:
        absolute_local_paths({"--images": "demo-data/siim/dicom-images-train"})
    message = str(e.value)
    assert "--images 'demo-data/siim/dicom-images-train'" in message
    assert str(job_copy) in message and "git does not ignore" in message
    assert "$PWD/demo-data/siim/dicom-images-train" in message and "s3://" in message


def test_in_a_job_copy_a_relative_output_is_refused_and_uploaded_inputs_are_found(job_copy, tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)compute.storage_path 'runs' is a relative path.*lost.*\$PWD/runs"):
        absolute_local_paths({"compute.storage_path": "runs"}, outputs=["compute.storage_path"])
    # An uploaded (tracked) file is there; absolute paths and URIs pass untouched.
    got = absolute_local_paths({"--config": "jobs/kfold.py", "--cache": str(tmp_path / "c"), "--x": "s3://b/k"}, outputs=["--cache"])
    assert got == {"--config": str(job_copy / "jobs/kfold.py"), "--cache": str(tmp_path / "c"), "--x": "s3://b/k"}


def test_kfold_in_a_job_copy_with_the_old_readme_paths_fails_before_starting_ray(job_copy, capsys):
    rc = main(["kfold", "--config", "demo", "--images", "demo-data/siim/dicom-images-train",
               "--labels", "demo-data/siim/train-rle.csv", "--cache", "demo-data/cache"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "ptxray kfold: error:" in err and "--images 'demo-data/siim/dicom-images-train'" in err


def test_storage_path_of_the_demo_recipe_is_refused_in_a_job_copy(job_copy, tmp_path, capsys):
    # The demo recipe's storage_path is relative (demo-data/runs): in a job it would land in the copy.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-rle.csv").write_text("ImageId,EncodedPixels\n")
    rc = main(["kfold", "--config", "demo", "--images", str(data), "--labels", str(data / "train-rle.csv"),
               "--cache", str(tmp_path / "cache")])  # fmt: skip
    assert rc == 2
    assert "compute.storage_path 'demo-data/runs' is a relative path" in capsys.readouterr().err


def test_absolute_paths_are_recorded_in_the_config(tmp_path, monkeypatch):
    from ptxray.cli import _absolute_data_paths

    monkeypatch.chdir(tmp_path)
    cfg, images, labels, cache = _absolute_data_paths(load_config("demo"), "d/images", "d/labels.csv", "s3://b/cache")
    assert (images, labels, cache) == (str(tmp_path / "d/images"), str(tmp_path / "d/labels.csv"), "s3://b/cache")
    assert cfg.data.images == images and cfg.data.labels == labels and cfg.data.cache == cache
    assert cfg.compute.storage_path == str(tmp_path / "demo-data/runs")
