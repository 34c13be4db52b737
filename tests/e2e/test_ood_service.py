"""The out-of-distribution verdict over HTTP against a real uvicorn process and the exported tiny model:
in_distribution on /predict, /predict/batch and /predict/base64, and the Prometheus counter."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from catdog import ood

pytestmark = pytest.mark.slow


def png(name: str) -> bytes:
    buffer = io.BytesIO()
    ood.skimage_non_pets((name,))[name].save(buffer, format="PNG")
    return buffer.getvalue()


def ood_counts(client: httpx.Client) -> tuple[float, float]:
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    return samples["catdog_out_of_distribution_total"], samples["catdog_ood_checked_total"]


def assert_verdict(body: dict, flag: bool) -> None:
    verdict = body["in_distribution"]
    assert set(verdict) == {"score", "threshold", "flag"}
    assert 0 <= verdict["score"] <= 1 and 0.1 <= verdict["threshold"] <= 0.5
    assert verdict["flag"] is flag and (verdict["score"] >= verdict["threshold"]) is flag


def test_pet_in_and_non_pet_out_of_distribution(server, photos) -> None:
    with server.client() as client:
        flagged, checked = ood_counts(client)
        pet = client.post(
            "/predict", files={"file": ("cat.jpg", photos["cat"][0].read_bytes(), "image/jpeg")}
        )
        coffee = client.post("/predict", files={"file": ("coffee.png", png("coffee"), "image/png")})
        after = ood_counts(client)
    assert pet.status_code == coffee.status_code == 200
    assert_verdict(pet.json(), True)
    assert_verdict(coffee.json(), False)
    assert coffee.json()["label"] in {"cat", "dog"}  # still answered, with the warning
    assert after == (flagged + 1, checked + 2)


def test_batch_and_base64_carry_the_verdict(server, photos) -> None:
    files = [
        # photos["dog"][0] is one of the few real pets the tiny 96 px model flags (score 0.12)
        ("files", ("dog.jpg", photos["dog"][1].read_bytes(), "image/jpeg")),
        ("files", ("text.png", png("text"), "image/png")),
    ]
    with server.client() as client:
        batch = client.post("/predict/batch", files=files)
        encoded = base64.b64encode(png("rocket")).decode()
        single = client.post("/predict/base64", json={"image": encoded, "filename": "rocket.png"})
    assert batch.status_code == single.status_code == 200
    dog, text = batch.json()["results"]
    assert_verdict(dog, True)
    assert_verdict(text, False)
    assert_verdict(single.json(), False)
