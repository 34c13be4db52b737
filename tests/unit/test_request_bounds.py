"""The service's bounds as plain objects: the decode budget (bytes, in order, cancellation-safe), the cgroup
limit it follows, and the multipart meter that counts parts as the body streams in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api import budget
from api.budget import DecodeBudget, OverBudget
from api.errors import BodyRefused
from api.middleware import BodyRule, MultipartMeter


def test_a_decode_larger_than_the_whole_budget_is_refused_at_once() -> None:
    async def scenario() -> None:
        pool = DecodeBudget(100)
        with pytest.raises(OverBudget, match="over the budget"):
            async with pool.reserve(101):
                pass
        assert pool.used == 0

    asyncio.run(scenario())


def test_decodes_wait_for_bytes_and_are_served_in_order() -> None:
    """60 + 60 > 100: the second waits; a small third one arriving later does not overtake it."""

    async def scenario() -> list[str]:
        pool = DecodeBudget(100)
        order: list[str] = []
        first_in = asyncio.Event()
        release_first = asyncio.Event()

        async def decode(name: str, amount: int, hold: asyncio.Event | None = None) -> None:
            async with pool.reserve(amount):
                order.append(name)
                assert pool.used <= pool.total
                if name == "first":
                    first_in.set()
                if hold is not None:
                    await hold.wait()

        first = asyncio.create_task(decode("first", 60, release_first))
        await first_in.wait()
        second = asyncio.create_task(decode("second", 60))
        await asyncio.sleep(0.01)
        third = asyncio.create_task(decode("third", 10))
        await asyncio.sleep(0.01)
        assert order == ["first"] and pool.waiting == 2
        release_first.set()
        await asyncio.gather(first, second, third)
        assert pool.used == 0
        return order

    assert asyncio.run(scenario()) == ["first", "second", "third"]


def test_a_cancelled_waiter_gives_its_place_back() -> None:
    async def scenario() -> None:
        pool = DecodeBudget(100)
        hold = asyncio.Event()

        async def holder() -> None:
            async with pool.reserve(90):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(pool.reserve(50).__aenter__())
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert pool.waiting == 0
        hold.set()
        await task
        assert pool.used == 0
        async with pool.reserve(100):
            assert pool.used == 100

    asyncio.run(scenario())


def test_the_memory_limit_follows_the_setting_then_the_cgroup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    v2 = tmp_path / "memory.max"
    monkeypatch.setattr(budget, "CGROUP_LIMIT_FILES", (v2,))
    assert budget.memory_limit_bytes(512) == 512 * budget.MiB
    assert budget.memory_limit_bytes(0) == budget.FALLBACK_LIMIT_MB * budget.MiB
    v2.write_text("max\n")
    assert budget.memory_limit_bytes(0) == budget.FALLBACK_LIMIT_MB * budget.MiB
    v2.write_text(f"{768 * budget.MiB}\n")
    assert budget.memory_limit_bytes(0) == 768 * budget.MiB


def _form(count: int, size: int, boundary: bytes = b"b0und") -> bytes:
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n\r\n'
    return b"".join(part + b"y" * size + b"\r\n" for _ in range(count)) + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_the_meter_counts_parts_across_any_chunking(chunk: int) -> None:
    """Delimiters split between chunks are still found: 5 parts pass a limit of 5, 6 do not."""
    rule = BodyRule("multipart/form-data", 10**9, max_parts=5, max_part_bytes=1000)
    body = _form(5, 100)
    meter = MultipartMeter(b"b0und", rule)
    for start in range(0, len(body), chunk):
        meter.feed(body[start : start + chunk])
    assert meter.parts == 5
    meter = MultipartMeter(b"b0und", rule)
    with pytest.raises(BodyRefused) as refused:
        body = _form(6, 100)
        for start in range(0, len(body), chunk):
            meter.feed(body[start : start + chunk])
    assert refused.value.status_code == 413 and refused.value.code == "too_many_files"


def test_the_meter_refuses_a_part_over_its_limit_before_it_ends() -> None:
    rule = BodyRule("multipart/form-data", 10**9, max_parts=5, max_part_bytes=1000)
    meter = MultipartMeter(b"b0und", rule)
    meter.feed(b'--b0und\r\nContent-Disposition: form-data; name="files"; filename="x"\r\n\r\n')
    with pytest.raises(BodyRefused) as refused:
        for _ in range(20):
            meter.feed(b"z" * 100)
    assert refused.value.code == "upload_too_large"
    assert meter.seen < 1200


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b;c"', b"a b;c"),
        ("multipart/form-data; xboundary=AAA; boundary=BBB", b"BBB"),
        ("multipart/form-data; boundary=AAA; boundary=BBB", b"BBB"),
        ("multipart/form-data", None),
    ],
)
def test_the_meter_reads_the_boundary_the_form_parser_splits_on(header: str, boundary: bytes | None) -> None:
    """A decoy `xboundary=` or a repeated parameter must not make the meter count other delimiters."""
    from python_multipart.multipart import parse_options_header

    from api.middleware import _boundary

    assert _boundary(header) == boundary
    assert parse_options_header(header)[1].get(b"boundary") == boundary


def test_base64_of_exactly_the_limit_is_accepted_and_one_byte_more_refused() -> None:
    import base64

    from api.errors import ApiError
    from api.routes.predict import decode_base64

    limit = 10 * 1024 * 1024  # 10485760 = 3k + 1: its base64 ends in padding
    assert len(decode_base64(base64.b64encode(b"\0" * limit).decode(), limit)) == limit
    with pytest.raises(ApiError) as refused:
        decode_base64(base64.b64encode(b"\0" * (limit + 1)).decode(), limit)
    assert refused.value.status == 413


def test_a_waiter_cancelled_just_before_a_release_stays_a_cancellation() -> None:
    """The release drops the cancelled entry from the queue first; the waiter must still end cancelled."""

    async def scenario() -> None:
        pool = DecodeBudget(100)
        held = pool.reserve(90)
        await held.__aenter__()
        waiter = asyncio.create_task(pool.reserve(50).__aenter__())
        await asyncio.sleep(0.01)
        waiter.cancel()
        await held.__aexit__(None, None, None)  # runs before the waiter sees its cancellation
        outcome = await asyncio.gather(waiter, return_exceptions=True)
        assert isinstance(outcome[0], asyncio.CancelledError), outcome
        assert pool.used == 0 and pool.waiting == 0

    asyncio.run(scenario())
