"""Start and stop a server process for the benchmarks: spawn, poll /ready, read its resident memory."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "datasets" / "cats_vs_dogs_sample"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS, MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Service:
    """A running server: base URL, process, log file, seconds from spawn to the first 200 on /ready."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_s: float

    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start(command: list[str], log: Path, env: dict[str, str], port: int, timeout: float = 120) -> Service:
    """Spawn `command` (which must listen on 127.0.0.1:`port`) and wait for a 200 on /ready."""
    url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT
        )
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if _answers(url + "/ready"):
            return Service(url, process, log, time.perf_counter() - started)
        time.sleep(0.01)
    stop(process)
    raise RuntimeError(f"{command} was not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the whole machine, one server process and this (client) process."""

    wall: float
    machine: float
    server: float
    client: float


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of all cores since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_sample(server_pid: int | None = None) -> CpuSample:
    return CpuSample(
        time.perf_counter(), _machine_cpu_seconds(), _process_cpu_seconds(server_pid), time.process_time()
    )


def cpu_usage(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Cores kept busy between two samples by the server, this client and everything else on the machine."""
    wall = max(after.wall - before.wall, 1e-9)
    server = after.server - before.server
    client = after.client - before.client
    other = max(after.machine - before.machine - server - client, 0.0)
    return {
        "server_cores": round(server / wall, 2),
        "client_cores": round(client / wall, 2),
        "other_cores": round(other / wall, 2),
    }


def other_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over `seconds` while this one sleeps."""
    before = cpu_sample()
    time.sleep(seconds)
    return cpu_usage(before, cpu_sample())["other_cores"]


def wait_quiet(limit: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until other processes keep less than `limit` cores busy; the last reading."""
    deadline = time.perf_counter() + timeout
    load = other_load()
    while load >= limit and time.perf_counter() < deadline:
        load = other_load(2.0)
    return load
