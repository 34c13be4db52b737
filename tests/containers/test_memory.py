"""The serving image under `docker run --memory 1g` (the Kubernetes pod's limit) and a 60 s barrage of
small files that decode to 40-megapixel pictures, mixed with real photos: the container is not OOM-killed,
every answer is 200 or a JSON 413 image_too_large, /health keeps answering, and the container's peak
memory is printed. The service finds the limit in its cgroup by itself (MEMORY_LIMIT_MB unset)."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import worst_images
from docker_cli import docker, inspect, wait_healthy

from catdog import preprocessing

pytestmark = pytest.mark.slow

MiB = 2**20
LIMIT_BYTES = 1024 * MiB  # --memory 1g
DECODE_MEMORY_FRACTION = 0.4  # api/settings.py's default, left unset here
BARRAGE_SECONDS = 60
CONCURRENCY = 8
PHOTOS_AFTER_EVERY = 3  # worst-case files between two real photos
PROBE_TIMEOUT = 5.0  # a /health slower than this counts as a failed probe
# Memory figures of the container's cgroup, v1 (this machine) or v2, and of its one process (PID 1).
CGROUP_V1 = "/sys/fs/cgroup/memory/memory.{}"
CGROUP_V2 = "/sys/fs/cgroup/memory.{}"


@pytest.fixture(scope="module")
def limited_container(serving_image: str, container_model: Path):
    """The image as deployed (non-root, read-only root, no capabilities) with 1 GiB of memory and no swap,
    serving the tiny model (fp32) on a random loopback port: (name, base URL). Removed at the end."""
    name = f"catdog-test-memory-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--label",
        "catdog.test=memory",
        "--memory",
        "1g",
        "--memory-swap",
        "1g",
        "--publish",
        "127.0.0.1::8000",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/lib/catdog:uid=10001,gid=10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        f"{container_model}:/models:ro",
        "--env",
        "MODEL_URI=/models",
        "--env",
        "MODEL_PRECISION=fp32",
        serving_image,
    )
    try:
        host_port = docker("port", name, "8000/tcp").stdout.split()[0]
        assert host_port.startswith("127.0.0.1:"), host_port
        assert wait_healthy(name, timeout=120) == "healthy"
        yield name, f"http://{host_port}"
    finally:
        logs = docker("logs", "--tail", "30", name, check=False)
        print(logs.stdout[-4000:], logs.stderr[-4000:])
        docker("rm", "--force", "--volumes", name, check=False)


def cgroup_value(container: str, *names: str) -> int | None:
    """The first of the cgroup's memory files `names` (v1 names, then v2) that the container can read."""
    for name in names:
        for template in (CGROUP_V1, CGROUP_V2):
            done = docker("exec", container, "cat", template.format(name), check=False)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                return int(done.stdout.strip())
    return None


def process_memory(container: str) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident set) of the container's PID 1, the service, in MiB."""
    status = docker("exec", container, "cat", "/proc/1/status").stdout
    return {
        key: int(value.split()[0]) / 1024
        for key, value in (line.split(":", 1) for line in status.splitlines() if ":" in line)
        if key in ("VmRSS", "VmHWM")
    }


def decode_budget_gauge(metrics: str) -> float:
    found = re.search(r"^catdog_decode_budget_bytes (\S+)$", metrics, re.MULTILINE)
    assert found, "no catdog_decode_budget_bytes in /metrics"
    return float(found.group(1))


class HealthProber:
    """Polls /health twice a second while the barrage runs: failures and the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures: list[str] = []
        self.slowest = 0.0
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=PROBE_TIMEOUT) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/health: {type(exc).__name__}")
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.probes += 1
                self._stop.wait(0.5)

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def uploads(photos: dict[str, list[Path]]) -> list[tuple[str, bytes, int]]:
    """Every worst-case file once and real photos in between: (name, bytes, expected status). A worst
    case gets 413 when its estimated decode exceeds the whole budget (0.4 x 1 GiB), else 200."""
    budget = LIMIT_BYTES * DECODE_MEMORY_FRACTION
    real = itertools.cycle(itertools.chain.from_iterable(zip(*photos.values(), strict=False)))
    items: list[tuple[str, bytes, int]] = []
    for name in worst_images.MAKERS:
        data = worst_images.worst(name)
        cost = preprocessing.plan_decode(data, size=224).cost_bytes
        items.append((name, data, 200 if cost <= budget else 413))
        if len(items) % (PHOTOS_AFTER_EVERY + 1) == PHOTOS_AFTER_EVERY:  # both kinds always in flight
            path = next(real)
            items.append((f"photo:{path.name}", path.read_bytes(), 200))
    return items


def test_a_barrage_of_worst_case_uploads_under_a_1g_limit_is_answered_without_oom(
    limited_container: tuple[str, str], photos: dict[str, list[Path]], say: Callable[[str], None]
) -> None:
    name, url = limited_container
    items = uploads(photos)
    expected = {item: status for item, _, status in items}
    assert 413 in expected.values() and list(expected.values()).count(200) > 10

    limit = cgroup_value(name, "limit_in_bytes", "max")
    assert limit == LIMIT_BYTES, f"the container's cgroup limit is {limit}, not --memory 1g"
    with httpx.Client(base_url=url, timeout=30) as client:
        budget = decode_budget_gauge(client.get("/metrics").text)
    # MEMORY_LIMIT_MB unset: the service took the cgroup's limit, not its 1024 MB fallback or the host's RAM.
    assert budget == pytest.approx(LIMIT_BYTES * DECODE_MEMORY_FRACTION, abs=1)
    before = process_memory(name)

    answers: Counter[tuple[str, int, str]] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    queue = itertools.cycle(items)
    sent = 0
    deadline = time.monotonic() + BARRAGE_SECONDS

    def worker(_: int) -> None:
        nonlocal sent
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    # Until the deadline, and at least one round of every file on a slow machine.
                    if time.monotonic() >= deadline and sent >= len(items):
                        return
                    label, data, _status = next(queue)
                    sent += 1
                try:
                    answer = client.post("/predict", files={"file": (label.split(":")[-1], data)})
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(f"{label}: {type(exc).__name__}: {exc}")
                    continue
                json_body = answer.headers.get("content-type", "").startswith("application/json")
                body = answer.json() if json_body else {}
                code = body.get("label") or body.get("error", {}).get("code", answer.text[:80])
                with lock:
                    answers[(label, answer.status_code, code)] += 1

    started = time.monotonic()
    with HealthProber(url) as prober, ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(worker, range(CONCURRENCY)))
    elapsed = time.monotonic() - started
    time.sleep(2)

    state = inspect(name)["State"]
    after = process_memory(name) if state["Running"] else {}
    peak = cgroup_value(name, "max_usage_in_bytes", "peak") if state["Running"] else None
    failcnt = cgroup_value(name, "failcnt") if state["Running"] else None
    by_status: Counter[int] = Counter()
    for (_label, status, _code), count in answers.items():
        by_status[status] += count
    say(
        f"--memory 1g barrage: {sum(answers.values())} answers in {elapsed:.0f}s at c={CONCURRENCY}: "
        f"{dict(sorted(by_status.items()))}, {len(errors)} transport errors; /health {prober.probes} probes, "
        f"slowest {prober.slowest * 1000:.0f} ms, {len(prober.failures)} failed"
    )
    say(
        f"--memory 1g barrage: service RSS before {before.get('VmRSS', 0):.0f} MiB, peak (VmHWM) "
        f"{after.get('VmHWM', 0):.0f} MiB, after {after.get('VmRSS', 0):.0f} MiB; container (cgroup) peak "
        f"{(peak or 0) / MiB:.0f} of {LIMIT_BYTES / MiB:.0f} MiB, limit hit {failcnt} times; "
        f"decode budget {budget / MiB:.0f} MiB; OOMKilled {state['OOMKilled']}"
    )
    for (label, status, code), count in sorted(answers.items()):
        if not label.startswith("photo:"):
            print(f"  {label:26s} {status} {code} x{count}")

    assert not state["OOMKilled"] and state["Running"], f"container state: {state}"
    assert errors == [], errors[:5]
    wrong = {key: count for key, count in answers.items() if key[1] != expected[key[0]]}
    assert wrong == {}, f"unexpected answers: {wrong}"
    for (label, status, code), _ in answers.items():
        assert code in ("cat", "dog") if status == 200 else code == "image_too_large", (label, code)
    assert prober.failures == [], prober.failures[:5]
    with httpx.Client(base_url=url, timeout=PROBE_TIMEOUT) as client:
        assert client.get("/health").status_code == 200
    assert after["VmHWM"] < LIMIT_BYTES / MiB
