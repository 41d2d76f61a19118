"""Shared fixtures: real fixtures on disk, a real S3 endpoint (moto_server), a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SIIM_SAMPLE = DATA / "siim-sample"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoS3:
    endpoint: str
    recording: Path

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def start_recording(self) -> None:
        self._post("reset-recording")
        self._post("start-recording")

    def stop_recording(self) -> list[dict]:
        self._post("stop-recording")
        if not self.recording.exists():
            return []
        return [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]

    def _post(self, what: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{what}", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()


def start_moto_server(recording: Path, **env: str) -> tuple[subprocess.Popen, MotoS3]:
    """A moto_server process on a free 127.0.0.1 port, answering; `env` adds to its environment
    (e.g. INITIAL_NO_AUTH_ACTION_COUNT="0": check credentials). Stop it with `stop_moto_server`."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        env=dict(os.environ, MOTO_RECORDER_FILEPATH=str(recording), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    return proc, MotoS3(endpoint=endpoint, recording=recording)


def stop_moto_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 HTTP endpoint on 127.0.0.1, with the AWS environment pointed at it.

    Set before any Ray starts, so Ray workers (children of the raylet) inherit it too.
    """
    proc, server = start_moto_server(tmp_path_factory.mktemp("moto") / "recording.jsonl")
    endpoint = server.endpoint
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        yield server
    finally:
        stop_moto_server(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """An embedded local Ray of our own (never someone else's cluster), with a short temp dir."""
    import ray

    from ptxray.ray_data import init_ray

    temp_dir = tempfile.mkdtemp(prefix="ptxr-", dir="/tmp")

    # ptxray's own embedded start (address ""; RAY_ADDRESS is not set in tests): the dashboard on
    # 127.0.0.1 (it serves the State API, which Ray Train's placement-group cleaner polls: without it
    # a stopped trial's placement group, its CPUs, is never released) and RAY_API_SERVER_ADDRESS in
    # its processes, which points that cleaner at this cluster when other Ray instances run here.
    assert "RAY_ADDRESS" not in os.environ, "tests start their own Ray; unset RAY_ADDRESS"
    # Four logical CPUs on two cores: a 1-CPU Train worker, the Ray Data reads and metadata tasks
    # that feed it, and a finishing trial's cleanup must all find room, or a trial waits forever.
    init_ray("", num_cpus=4, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class DciodvfyReport:
    errors: list[str]  # every "Error - ..." line, and "Abort - ..." (a file it cannot read)
    warnings: list[str]  # every "Warning - ..." line
    output: str  # all of stdout and stderr, for the failure message


def parse_dciodvfy(output: str) -> DciodvfyReport:
    """dciodvfy (dicom3tools) writes one finding per line, starting "Error - ", "Warning - " or, when
    it cannot read the file at all, "Abort - " (the IOD's name and other context lines start otherwise)."""
    lines = [line.strip() for line in output.splitlines()]
    return DciodvfyReport(
        errors=[line for line in lines if line.startswith(("Error - ", "Abort - "))],
        warnings=[line for line in lines if line.startswith("Warning - ")],
        output=output,
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _validate_dicom(path) -> DciodvfyReport | None:
    """Run dciodvfy on `path` and fail the test on any Error line; returns the report.

    Without dciodvfy the check cannot run: in CI (CI=true, where .ci/run installs dicom3tools) that
    fails the test, since a validator that silently never runs proves nothing; elsewhere it warns and
    returns None (install it with `apt-get install dicom3tools`).
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        if in_ci():
            pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; CI must validate every DICOM SEG")
        import warnings

        warnings.warn(f"dciodvfy not installed: {path} was not validated (apt-get install dicom3tools)", stacklevel=2)
        return None
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    report = parse_dciodvfy(done.stdout + done.stderr)
    # It exits 1 on errors (0 with warnings only): a non-zero status without an Error line is a
    # failure too, rather than a pass on output this parser did not understand.
    if report.errors or done.returncode != 0:
        pytest.fail(
            f"dciodvfy rejects {path} (exit status {done.returncode}):\n"
            + "\n".join(report.errors) + "\n--- full output ---\n" + report.output
        )
    return report


@pytest.fixture
def validate_dicom():
    """`validate_dicom(path)`: the standard's validator (dciodvfy) on a DICOM file the test wrote;
    fails on any `Error -` line and returns the parsed report (None where it is not installed, outside CI)."""
    return _validate_dicom


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """A small synthetic SIIM-layout dataset (real JPEG DICOMs + RLE CSV), generated once."""
    from ptxray.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(str(out), n=24, size=256, positive_rate=0.25, seed=3)
    return out


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A real local Ray cluster of our own (`ray start`: a head + one extra worker node, two CPUs
    each (logical), dashboard and Jobs API with token auth on free ports), stopped after the module; its
    processes must all be gone afterwards. Submit jobs with `ptxray.ray_cluster.submit_job`."""
    from ptxray.ray_cluster import alive_pids, start_local_cluster, stop_local_cluster

    state = tmp_path_factory.mktemp("ray-cluster")
    cluster = start_local_cluster(
        state, num_cpus=2, workers=1, worker_cpus=2, object_store_memory_bytes=200 * 1024**2, timeout_s=180
    )
    try:
        yield cluster
    finally:
        stop_local_cluster(cluster)
    assert alive_pids(cluster) == [], "processes of the local cluster survived stop_local_cluster"
    assert not cluster.temp_dir.exists()


@pytest.fixture(scope="session")
def trained_run(ray_local, synth_dataset, tmp_path_factory):
    """A real, briefly trained 2-fold run in the K-fold layout (summary.json naming each fold's
    `engine.fit` folder) at 64 px, with data.cache / images / labels in its config. Shared by the
    predict, thresholds and evaluate tests; the cache is prepared through Ray Data (`ray_local`)."""
    from ptxray import ray_data
    from ptxray.config import load_config
    from ptxray.runner import train_fold

    root = tmp_path_factory.mktemp("trained-run")
    images, labels = synth_dataset / "dicom-images-train", synth_dataset / "train-rle.csv"
    cfg = load_config("smoke", {"train.epochs": 2, "optim.lr": 3e-3, "data.images": str(images), "data.labels": str(labels),
                                "data.cache": str(root / "cache")})
    prepared = ray_data.prepare(cfg, images=str(images), labels=str(labels), cache=cfg.data.cache)
    run_dir = root / "runs" / "exp"
    fold_dirs = {}
    for fold in (0, 1):
        fold_dirs[fold] = str(root / "runs" / "exp.train" / f"fold{fold}")
        train_fold(cfg.with_overrides({"train.fold": fold}), prepared["cache"], fold_dirs[fold], device="cpu")
    run_dir.mkdir(parents=True)
    summary = {"metric": "val_dice", "mode": "max", "rows": [], "best": {"params": {}, "fold_checkpoints": fold_dirs}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: on 2 shared cores, OpenMP threads spinning against other
    processes are slower than one thread."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
