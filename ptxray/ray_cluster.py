"""A local Ray cluster of our own: one head (dashboard + Jobs API, token authentication on) and
optionally extra worker nodes on the same machine, started with the real `ray start` CLI.

Every port is chosen free (never Ray's defaults 6379/8265/10001/52365, which other clusters on a
shared machine use), a single-node cluster listens on 127.0.0.1 only (GCS, raylet, agents,
dashboard, Ray client server, workers), and the token lives in the state dir (never
~/.ray/auth_token, which other clusters on the machine read). `ray stop` is not scoped: it kills
every Ray process on the machine, so `stop_local_cluster` stops exactly our processes, found by a
marker variable in their environment and by the process tree under them; a Ctrl-C or SIGTERM
during the stop is held until it is done.

    cluster = start_local_cluster(".ptxray/cluster", workers=1)
    job_id, status = submit_job(cluster, "python jobs/kfold.py --config kfold")
    stop_local_cluster(cluster)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import psutil

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
# Every process of the cluster inherits this variable, so `stop` can find the daemons `ray start`
# detached from us (they are reparented to init) without matching on names other clusters share.
MARKER_ENV = "PTXRAY_CLUSTER_ID"
# Ray's unix sockets live under the temp dir and sun_path holds ~107 bytes; a state dir deep in a
# checkout overflows it, so the temp dir is short and under /tmp, and recorded in cluster.json.
TEMP_PREFIX = "ptxr-rc-"
# Ray's default worker port range (10002-19999) is what other clusters here use; ours come from
# above it and below the kernel's ephemeral range, one block per node.
WORKER_PORT_FLOOR = 20000
WORKER_PORTS_PER_NODE = 100
# Not shipped to the cluster with --working-dir: the venv and VCS data are large, and the state
# dir holds the token.
DEFAULT_EXCLUDES = (".git", ".venv", ".ptxray", "__pycache__", "*.egg-info", ".pytest_cache")
# A caller's own Ray settings must not leak into our cluster (a stray RAY_AUTH_TOKEN could win over our file).
_INHERITED_RAY_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
)


# Deferred while a cluster is being stopped (SIGHUP: the terminal that ran us was closed).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ClusterError(RuntimeError):
    """A local cluster could not be started, found or reached."""


@dataclass(frozen=True)
class LocalCluster:
    state_dir: Path
    gcs_address: str  # host:port, for `ray start --address` and ray.init inside the cluster
    dashboard_url: str  # http://127.0.0.1:port, for `ray job submit` and the browser
    token_path: Path
    temp_dir: Path
    pids: list[int]
    cluster_id: str = ""
    # pid -> psutil create_time, so a recycled pid is never mistaken for ours
    create_times: dict[int, float] = field(default_factory=dict)
    nodes: int = 1

    def env(self) -> dict[str, str]:
        """What a client (`ray job submit`, `ray job logs`) needs in its environment."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def to_json(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "gcs_address": self.gcs_address,
            "dashboard_url": self.dashboard_url,
            "token_path": str(self.token_path),
            "temp_dir": str(self.temp_dir),
            "cluster_id": self.cluster_id,
            "nodes": self.nodes,
            "processes": [{"pid": p, "create_time": self.create_times.get(p)} for p in self.pids],
            "env": self.env(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LocalCluster":
        procs = d["processes"]
        return cls(
            state_dir=Path(d["state_dir"]),
            gcs_address=d["gcs_address"],
            dashboard_url=d["dashboard_url"],
            token_path=Path(d["token_path"]),
            temp_dir=Path(d["temp_dir"]),
            pids=[int(p["pid"]) for p in procs],
            cluster_id=d.get("cluster_id", ""),
            create_times={int(p["pid"]): p["create_time"] for p in procs if p.get("create_time") is not None},
            nodes=int(d.get("nodes", 1)),
        )


# ----------------------------------------------------------------------------------------- ports


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now. All sockets stay open until the end so none repeats.
    Bound on all interfaces: a port someone else holds on any address is not free for us."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port_range(size: int, avoid: Iterable[tuple[int, int]] = ()) -> tuple[int, int]:
    """A block of `size` ports, all free now, outside Ray's default worker range and the
    ephemeral range; random so two of our clusters started at once rarely pick the same block."""
    avoid = list(avoid)
    starts = list(range(WORKER_PORT_FLOOR, _ephemeral_floor() - size, size))
    random.shuffle(starts)
    for lo in starts:
        hi = lo + size - 1
        if any(lo <= a_hi and a_lo <= hi for a_lo, a_hi in avoid):
            continue
        if all(_port_is_free(p) for p in range(lo, hi + 1)):
            return lo, hi
    raise ClusterError(f"no free block of {size} worker ports between {WORKER_PORT_FLOOR} and the ephemeral range")


# ------------------------------------------------------------------------------------- processes


def _ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise ClusterError(f"the `ray` CLI is neither beside {sys.executable} nor on PATH")
    return found


def _cluster_env(cluster_id: str, token_path: Path, dashboard_url: str) -> dict[str, str]:
    """Environment of every process of the cluster (inherited by workers and job drivers).

    RAY_API_SERVER_ADDRESS is the cluster's own dashboard: State API and job clients inside the
    cluster that are given no address (Ray Train's placement-group cleaner) would otherwise scan
    this machine for "the" cluster and fail when another Ray instance runs here (see ray_data.init_ray)."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_RAY_VARS}
    # Job entrypoints (`python jobs/kfold.py`) resolve `python` on the raylet's PATH: put this
    # interpreter's bin dir first so jobs run in the same environment as ptxray.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_API_SERVER_ADDRESS=dashboard_url,
        **{MARKER_ENV: cluster_id},
    )
    return env


def _client_env(cluster: LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_RAY_VARS}
    env.update(cluster.env())
    return env


def _marked_processes(cluster_id: str) -> list[psutil.Process]:
    if not cluster_id:
        return []
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER_ENV) == cluster_id:
                found.append(p)
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read
    return found


def _recorded_processes(cluster: LocalCluster) -> list[psutil.Process]:
    found = []
    for pid in cluster.pids:
        try:
            p = psutil.Process(pid)
            want = cluster.create_times.get(pid)
            if want is None or abs(p.create_time() - want) > 0.5:
                continue  # the pid was recycled by an unrelated process
            found.append(p)
        except psutil.Error:
            continue
    return found


def cluster_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """Every live process of this cluster: the recorded daemons, anything carrying our marker,
    and all their descendants (Ray workers and agents rename themselves with setproctitle, which
    also clobbers /proc/<pid>/environ, so they are found through the tree)."""
    roots = {p.pid: p for p in _recorded_processes(cluster) + _marked_processes(cluster.cluster_id)}
    everything = dict(roots)
    for p in roots.values():
        try:
            everything.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    everything.pop(os.getpid(), None)
    return list(everything.values())


def alive_pids(cluster: LocalCluster) -> list[int]:
    return sorted(p.pid for p in cluster_processes(cluster) if _alive(p))


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _terminate(procs: list[psutil.Process], grace_s: float) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While the cluster is being stopped, a Ctrl-C or SIGTERM must not cut the stop short (that
    is what leaves a GCS behind): the signal is held and delivered again once the block is done.
    Python handles signals in the main thread only; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


# ----------------------------------------------------------------------------------------- HTTP


def _get(url: str, token: str | None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _alive_node_count(dashboard_url: str, token: str) -> int:
    code, body = _get(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=false", token)
    if code != 200:
        return -1
    rows = json.loads(body)["data"]["result"]["result"]
    return sum(1 for r in rows if r.get("state") == "ALIVE")


def _wait_for(what: str, check, timeout_s: float, log_hint: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.5)
    raise ClusterError(f"{what} not ready after {timeout_s:.0f} s (last: {last}); logs: {log_hint}")


# ------------------------------------------------------------------------------------ lifecycle


def _state_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir).expanduser().absolute()


def load_cluster(state_dir: str | os.PathLike) -> LocalCluster:
    path = _state_dir(state_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no local cluster recorded here (start one with `ptxray cluster up`)")
    try:
        return LocalCluster.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(f"{path}: not a cluster record ({e})") from e


def _write_token(path: Path) -> None:
    # Same format as Ray's own generator (ray._private.authentication.authentication_token_generator):
    # 256 bits as hex. Created 0600 from the start, never readable by others even briefly.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _run_ray_start(args: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> None:
    # Output goes to a file, not a pipe: the daemons `ray start` leaves behind must not hold our pipe.
    with open(log_path, "ab") as out:
        out.write(f"$ {shlex.join(args)}\n".encode())
        out.flush()
        try:
            # Its own session: a Ctrl-C in our terminal reaches us, and we stop what it started,
            # instead of reaching `ray start` halfway through starting the daemons.
            rc = subprocess.run(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, start_new_session=True
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"`ray start` did not return in {timeout_s:.0f} s; see {log_path}") from e
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise ClusterError(f"`ray start` failed with exit code {rc} (log {log_path}):\n{tail}")


def _node_ports(avoid_ranges: list[tuple[int, int]]) -> dict[str, Any]:
    (nm, om, agent_http, agent_grpc, rt_env, metrics) = _free_ports(6)
    lo, hi = _free_port_range(WORKER_PORTS_PER_NODE, avoid_ranges)
    avoid_ranges.append((lo, hi))
    return {
        "--node-manager-port": nm,
        "--object-manager-port": om,
        "--dashboard-agent-listen-port": agent_http,
        "--dashboard-agent-grpc-port": agent_grpc,
        "--runtime-env-agent-port": rt_env,
        "--metrics-export-port": metrics,
        "--min-worker-port": lo,
        "--max-worker-port": hi,
    }


def _flags(d: dict[str, Any]) -> list[str]:
    return [x for k, v in d.items() if v is not None for x in (k, str(v))]


def start_local_cluster(
    state_dir: str | os.PathLike,
    *,
    num_cpus: int | None = None,
    workers: int = 0,
    worker_cpus: int = 1,
    dashboard_port: int = 0,
    gcs_port: int = 0,
    object_store_memory_bytes: int | None = None,
    timeout_s: float = 120,
) -> LocalCluster:
    """Start a head (+ `workers` extra nodes) and return once the Jobs API answers with the token
    and every node is alive. Ports given as 0 are chosen free."""
    if workers < 0 or worker_cpus < 0 or (num_cpus is not None and num_cpus < 0):
        raise ValueError(f"workers={workers}, worker_cpus={worker_cpus}, num_cpus={num_cpus}: must not be negative")
    for flag, port in (("dashboard port", dashboard_port), ("GCS port", gcs_port)):
        if port and not _port_is_free(port):
            raise ClusterError(f"{flag} {port} is in use (another Ray cluster?); choose another, or 0 for a free one")
    state = _claim_state_dir(state_dir)

    cluster_id = secrets.token_hex(8)
    token_path = state / TOKEN_FILE
    _write_token(token_path)
    temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
    start_log = state / "ray-start.log"
    start_log.write_text("")

    gcs_port, dashboard_port = (p or free for p, free in zip((gcs_port, dashboard_port), _free_ports(2)))
    gcs_address = f"127.0.0.1:{gcs_port}"  # until `ray start` tells us the address it chose
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    env = _cluster_env(cluster_id, token_path, dashboard_url)
    partial = LocalCluster(state, gcs_address, dashboard_url, token_path, temp_dir, [], cluster_id)
    ranges: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout_s
    try:
        head = {
            "--port": gcs_port,
            "--include-dashboard": "true",
            "--dashboard-host": "127.0.0.1",
            "--dashboard-port": dashboard_port,
            "--ray-client-server-port": _free_ports(1)[0],
            "--temp-dir": temp_dir,
            "--num-cpus": num_cpus,
            "--object-store-memory": object_store_memory_bytes,
            **_node_ports(ranges),
        }
        _start_head(head, env, loopback_only=workers == 0, start_log=start_log, timeout_s=timeout_s)
        # The GCS address is read back from what `ray start` wrote (with extra nodes, Ray replaces
        # a loopback address with the machine's).
        gcs_address = (temp_dir / "ray_current_cluster").read_text().strip() or gcs_address
        token = token_path.read_text().strip()
        hint = f"{temp_dir}/session_latest/logs"
        _wait_for(
            f"Jobs API at {dashboard_url}",
            lambda: _get(f"{dashboard_url}/api/jobs/", token)[0] == 200,
            max(1.0, deadline - time.monotonic()),
            hint,
        )
        for i in range(workers):
            # Each extra node gets its own temp dir, as separate machines would have. Sharing the
            # head's breaks jobs: a node's runtime-env agent deletes a job's unpacked working_dir
            # when its own tasks are done with it, and with one shared dir that is the directory
            # the job driver runs in (torch then fails to load in the driver: cwd is gone).
            node_temp_dir = temp_dir / f"node{i + 1}"
            node_temp_dir.mkdir()
            node = {
                "--address": gcs_address,
                "--num-cpus": worker_cpus,
                "--temp-dir": node_temp_dir,
                "--object-store-memory": object_store_memory_bytes,
                **_node_ports(ranges),
            }
            _run_ray_start([_ray_exe(), "start", *_flags(node)], env, start_log, max(1.0, deadline - time.monotonic()))
        _wait_for(
            f"{1 + workers} alive nodes",
            lambda: _alive_node_count(dashboard_url, token) >= 1 + workers,
            max(1.0, deadline - time.monotonic()),
            hint,
        )
    except BaseException:
        stop_local_cluster(partial)
        raise
    return _record_cluster(
        LocalCluster(state, gcs_address, dashboard_url, token_path, temp_dir, [], cluster_id, nodes=1 + workers)
    )


def _claim_state_dir(state_dir: str | os.PathLike) -> Path:
    """The state dir, created; ClusterError when a cluster recorded there still runs (a stale
    record's leftovers are stopped)."""
    state = _state_dir(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE_FILE).exists():
        old = load_cluster(state)
        if alive_pids(old):
            raise ClusterError(
                f"{state}: a cluster is already running here (dashboard {old.dashboard_url}); "
                f"stop it with `ptxray cluster down --state-dir {state}`"
            )
        stop_local_cluster(old)  # stale record: clean what is left of it
    return state


def _start_head(head: dict[str, Any], env: dict[str, str], *, loopback_only: bool, start_log: Path, timeout_s: float) -> None:
    head_args = [_ray_exe(), "start", "--head", "--disable-usage-stats", *_flags(head)]
    head_env = env
    if loopback_only:
        head_args += ["--node-ip-address", "127.0.0.1"]
        # Ray's servers (GCS, raylet, agents, client server, workers) listen on loopback only
        # when the node's address is 127.0.0.1, but `ray start` swaps a loopback address for
        # the machine's, except in the single-machine mode it runs on macOS and Windows, which
        # this variable selects (ray._private.services.get_node_ip_address). That mode refuses
        # extra nodes, so a cluster with `workers` binds as Ray does by default.
        head_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    else:
        log.warning("a cluster with extra worker nodes listens on the machine's address, not on loopback only")
    _run_ray_start(head_args, head_env, start_log, timeout_s)


def _record_cluster(started: LocalCluster) -> LocalCluster:
    """`started` with the pids (and start times) of its processes, written to cluster.json, its
    logs linked from the state dir."""
    create_times = {}
    for p in _marked_processes(started.cluster_id):
        try:
            create_times[p.pid] = p.create_time()
        except psutil.Error:
            continue
    cluster = replace(started, pids=sorted(create_times), create_times=create_times)
    state = cluster.state_dir
    (state / STATE_FILE).write_text(json.dumps(cluster.to_json(), indent=2))
    logs_link = state / "logs"
    logs_link.unlink(missing_ok=True)
    logs_link.symlink_to(cluster.temp_dir / "session_latest" / "logs")
    log.info("local Ray cluster up: %s (%d nodes, %d processes)", cluster.dashboard_url, cluster.nodes, len(cluster.pids))
    return cluster


def stop_local_cluster(state_dir_or_cluster: str | os.PathLike | LocalCluster, grace_s: float = 15.0) -> None:
    """Stop exactly the processes of this cluster (raylets first, the GCS last, as `ray stop`
    orders them, so no component waits on one already gone), then remove its temp dir and record."""
    c = state_dir_or_cluster if isinstance(state_dir_or_cluster, LocalCluster) else load_cluster(state_dir_or_cluster)
    with _signals_deferred():
        _stop(c, grace_s)


def _stop(c: LocalCluster, grace_s: float) -> None:
    procs = cluster_processes(c)  # the whole tree now: once parents die, children reparent to init
    raylet_tree: dict[int, psutil.Process] = {}
    for p in procs:
        if _name(p) == "raylet":
            raylet_tree[p.pid] = p
            try:
                raylet_tree.update({ch.pid: ch for ch in p.children(recursive=True)})
            except psutil.Error:
                pass
    gcs = [p for p in procs if _name(p) == "gcs_server"]
    rest = [p for p in procs if p.pid not in raylet_tree and p not in gcs]
    for phase in (list(raylet_tree.values()), rest, gcs):
        if phase:
            _terminate(phase, grace_s)
    # Anything started while we were stopping (a worker the raylet forked late) goes too.
    leftovers = [p for p in cluster_processes(c) if _alive(p)]
    if leftovers:
        _terminate(leftovers, 2.0)
    if c.temp_dir.name.startswith(TEMP_PREFIX) and c.temp_dir.parent == Path("/tmp"):
        shutil.rmtree(c.temp_dir, ignore_errors=True)
    for name in (STATE_FILE, TOKEN_FILE, "logs"):
        path = c.state_dir / name
        if path.is_symlink() or path.exists():
            path.unlink()
    log.info("local Ray cluster at %s stopped (%d processes)", c.dashboard_url, len(procs))


# ----------------------------------------------------------------------------------------- jobs


def dashboard_answers(cluster: LocalCluster) -> tuple[bool, str]:
    """(True, '<n> nodes alive') when the Jobs API answers with our token, else (False, why)."""
    try:
        code, _ = _get(f"{cluster.dashboard_url}/api/jobs/", cluster.token())
        if code != 200:
            return False, f"HTTP {code}"
        return True, f"{_alive_node_count(cluster.dashboard_url, cluster.token())} nodes alive"
    except (OSError, ValueError) as e:
        return False, str(e)


def job_info(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    code, body = _get(f"{cluster.dashboard_url}/api/jobs/{job_id}", cluster.token())
    if code != 200:
        raise ClusterError(f"job {job_id} at {cluster.dashboard_url}: HTTP {code}: {body[:200]!r}")
    return json.loads(body)


def job_logs(cluster: LocalCluster, job_id: str) -> str:
    code, body = _get(f"{cluster.dashboard_url}/api/jobs/{job_id}/logs", cluster.token(), timeout_s=30)
    if code != 200:
        raise ClusterError(f"logs of job {job_id} at {cluster.dashboard_url}: HTTP {code}: {body[:200]!r}")
    return json.loads(body)["logs"]


def submit_job(
    cluster: LocalCluster,
    entrypoint: str,
    *,
    working_dir: str | os.PathLike | None = ".",
    runtime_env: dict[str, Any] | None = None,
    follow: bool = True,
    submission_id: str | None = None,
) -> tuple[str, str]:
    """Submit `entrypoint` with the real `ray job submit` CLI and return (job_id, status).

    With follow, the CLI tails the job's logs to our stdout and the status is final; without,
    it returns right after submission (status PENDING or RUNNING). The working dir is uploaded
    (Ray honours .gitignore there) minus DEFAULT_EXCLUDES.
    """
    job_id = submission_id or f"ptxray-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    env_spec = dict(runtime_env or {})
    if working_dir is not None:
        env_spec["working_dir"] = str(Path(working_dir).absolute())
        env_spec["excludes"] = list(env_spec.get("excludes", [])) + [
            x for x in DEFAULT_EXCLUDES if x not in env_spec.get("excludes", [])
        ]
    args = [_ray_exe(), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id]
    if env_spec:
        args += ["--runtime-env-json", json.dumps(env_spec)]
    if not follow:
        args.append("--no-wait")
    args += ["--", *shlex.split(entrypoint)]
    # Its own session: a Ctrl-C in our terminal is ours to handle (the CLI would only stop tailing
    # and say the job goes on); if we are stopped, the client goes with us (`finally`).
    proc = subprocess.Popen(
        args, env=_client_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            # Re-emitted line by line (not inherited fds) so callers that capture sys.stdout see it.
            sys.stdout.write(line)
            sys.stdout.flush()
            tail = (tail + [line])[-20:]
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    code, body = _get(f"{cluster.dashboard_url}/api/jobs/{job_id}", cluster.token())
    if code != 200:
        raise ClusterError(f"`ray job submit` of {entrypoint!r} failed (exit code {rc}):\n{''.join(tail)}")
    return job_id, json.loads(body)["status"]
