"""POST /predict, /predict/batch and /predict/base64 over HTTP against a real uvicorn process and model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import odd_images
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def as_format(photo: Path, fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    """A real photo re-encoded losslessly (224x224 so every format decodes to the same pixels)."""
    with Image.open(photo) as img:
        picture = img.convert("RGB").resize((224, 224)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def post_file(client: httpx.Client, data: bytes, name: str = "photo.jpg", **kwargs) -> httpx.Response:
    return client.post("/predict", files={"file": (name, data, "image/jpeg")}, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    """The one error shape: status, JSON {"error": {"code", "message"}}, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and "Traceback" not in response.text
    return body["error"]


def test_predicts_a_real_photo(server, photos) -> None:
    with server.client() as client:
        response = post_file(client, photos["dog"][0].read_bytes())
    assert response.status_code == 200
    body = response.json()
    assert body["label"] in {"cat", "dog"}
    assert set(body["probabilities"]) == {"cat", "dog"}
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"]["name"] == "tf_efficientnet_lite0" and len(body["model"]["version"]) == 12
    assert body["request_id"] == response.headers["x-request-id"] and body["latency_ms"] > 0


def test_answers_match_the_evaluation_stage(server, served_project) -> None:
    """No train/serve skew: the service's probabilities for the test files equal the evaluate stage's."""
    import csv

    with (served_project / "reports" / "evaluate" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    with server.client() as client:
        for row in rows:
            path = served_project / "data" / "processed" / row["path"]
            answer = post_file(client, path.read_bytes(), path.name).json()
            assert answer["probabilities"]["dog"] == pytest.approx(float(row["p_dog"]), abs=1e-4)
            assert answer["probabilities"]["cat"] == pytest.approx(float(row["p_cat"]), abs=1e-4)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_give_the_same_answer(server, photos, fmt: str) -> None:
    photo = photos["cat"][0]
    options = {"lossless": True} if fmt == "WEBP" else {}
    with server.client() as client:
        reference = post_file(client, as_format(photo, "PNG"), "cat.png").json()["probabilities"]
        answer = post_file(client, as_format(photo, fmt, **options), f"cat.{fmt.lower()}").json()
    assert answer["probabilities"] == pytest.approx(reference, abs=1e-5)


def test_format_is_read_from_the_bytes_not_the_name_or_type(server, photos) -> None:
    png = as_format(photos["cat"][0], "PNG")
    with server.client() as client:
        named = client.post("/predict", files={"file": ("cat.png", png, "image/png")}).json()
        misnamed = client.post("/predict", files={"file": ("cat.gif", png, "application/pdf")}).json()
    assert misnamed["probabilities"] == named["probabilities"]


ODD_BUT_VALID = {
    "cmyk": odd_images.cmyk_jpeg,
    "grayscale": odd_images.grayscale_jpeg,
    "palette": odd_images.palette_png,
    "alpha": odd_images.rgba_png,
    "16bit": odd_images.png16,
    "exif_rotated": odd_images.exif_rotated_jpeg,
    "animated_gif": odd_images.animated_gif,
}


@pytest.mark.parametrize("kind", sorted(ODD_BUT_VALID))
def test_odd_but_valid_images_are_predicted(server, kind: str) -> None:
    with server.client() as client:
        response = post_file(client, ODD_BUT_VALID[kind](), f"odd.{kind}")
    assert response.status_code == 200, response.text
    assert sum(response.json()["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_animated_gif_uses_its_first_frame(server, photos) -> None:
    frames = [
        Image.open(path).convert("RGB").resize((200, 160)) for path in (photos["cat"][1], photos["dog"][1])
    ]
    animated, first = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(first, format="GIF")
    with server.client() as client:
        both = post_file(client, animated.getvalue(), "anim.gif").json()["probabilities"]
        only_first = post_file(client, first.getvalue(), "first.gif").json()["probabilities"]
    assert both == pytest.approx(only_first, abs=1e-6)


BAD_UPLOADS = {
    "zero_bytes": (b"", 400, "empty_file"),
    "truncated_jpeg": (odd_images.truncated_jpeg(), 422, "corrupt_image"),
    "random_bytes": (odd_images.random_bytes(), 415, "not_an_image"),
    "text_named_jpg": (b"just some text, not a picture\n" * 20, 415, "not_an_image"),
    "pdf_named_jpg": (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
        415,
        "not_an_image",
    ),
    "decompression_bomb": (odd_images.bomb_png(), 413, "image_too_large"),
    "tiny_image": (odd_images.tiny_jpeg(), 200, None),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_files_get_a_clear_error(server, case: str) -> None:
    data, status, code = BAD_UPLOADS[case]
    with server.client() as client:
        response = post_file(client, data, "photo.jpg")
    if code is None:
        assert response.status_code == status
    else:
        assert_error(response, status, code)


def test_bad_requests_get_a_clear_error(server) -> None:
    with server.client() as client:
        empty = client.post(
            "/predict", headers={"content-type": "multipart/form-data; boundary=x"}, content=b""
        )
        missing = client.post("/predict", files={"image": ("a.jpg", odd_images.jpeg(), "image/jpeg")})
        not_a_file = client.post(
            "/predict", data={"file": "hello"}, files={"other": ("a", b"x", "text/plain")}
        )
        json_body = client.post("/predict", json={"file": "x"})
        no_type = client.post("/predict", content=odd_images.jpeg())
        raw_jpeg = client.post("/predict", content=odd_images.jpeg(), headers={"content-type": "image/jpeg"})
        broken = client.post(
            "/predict",
            content=b"--zz\r\nnonsense",
            headers={"content-type": "multipart/form-data; boundary=zz"},
        )
        wrong_method = client.get("/predict")
        unknown = client.get("/nowhere")
    assert_error(empty, 422, "invalid_request")
    assert "file" in assert_error(missing, 422, "invalid_request")["message"]
    assert_error(not_a_file, 422, "invalid_request")
    assert "multipart/form-data" in assert_error(json_body, 415, "unsupported_media_type")["message"]
    assert_error(no_type, 415, "unsupported_media_type")
    assert_error(raw_jpeg, 415, "unsupported_media_type")
    assert broken.status_code in (400, 422) and "error" in broken.json()
    assert_error(wrong_method, 405, "method_not_allowed")
    assert_error(unknown, 404, "not_found")


def test_upload_over_the_limit_is_refused_without_reading_it(server) -> None:
    big = b"\xff\xd8\xff" + bytes(30 * 1024 * 1024)
    rss_before = server.rss_mb()
    with server.client() as client:
        declared = post_file(client, big, "big.jpg")

        def chunks():
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            for _ in range(30):
                yield bytes(1024 * 1024)

        streamed = client.post(
            "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
        still_serving = post_file(client, odd_images.jpeg())
    assert "limit" in assert_error(declared, 413, "upload_too_large")["message"]
    assert_error(streamed, 413, "upload_too_large")
    assert "content-length" not in streamed.request.headers
    assert still_serving.status_code == 200
    assert server.rss_mb() - rss_before < 25, "a 30 MB upload was read into memory"


def test_batch_answers_each_file_in_order(server, photos) -> None:
    cat, dog = photos["cat"][2].read_bytes(), photos["dog"][2].read_bytes()
    files = [
        ("files", ("cat.jpg", cat, "image/jpeg")),
        ("files", ("notes.jpg", b"not an image", "image/jpeg")),
        ("files", ("dog.jpg", dog, "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
    ]
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
        singles = [post_file(client, data).json() for data in (cat, dog)]
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["cat.jpg", "notes.jpg", "dog.jpg", "empty.jpg"]
    assert results[1]["error"]["code"] == "not_an_image" and results[3]["error"]["code"] == "empty_file"
    for result, single in zip((results[0], results[2]), singles, strict=True):
        assert result["label"] == single["label"]
        assert result["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_batch_limits(server) -> None:
    limit = 32
    many = [
        ("files", (f"{i}.jpg", odd_images.jpeg(i, size=(40, 40)), "image/jpeg")) for i in range(limit + 1)
    ]
    with server.client() as client:
        too_many = client.post("/predict/batch", files=many)
        at_limit = client.post("/predict/batch", files=many[:limit])
        none = client.post("/predict/batch", headers={"content-type": "multipart/form-data; boundary=x"})
    assert str(limit) in assert_error(too_many, 413, "too_many_files")["message"]
    assert at_limit.status_code == 200 and len(at_limit.json()["results"]) == limit
    assert_error(none, 422, "invalid_request")


def test_base64_gives_the_same_answer(server, photos) -> None:
    data = photos["dog"][3].read_bytes()
    encoded = base64.b64encode(data).decode()
    with server.client() as client:
        upload = post_file(client, data).json()
        plain = client.post("/predict/base64", json={"image": encoded})
        data_url = client.post("/predict/base64", json={"image": f"data:image/jpeg;base64,{encoded}"})
    assert plain.status_code == 200 and data_url.status_code == 200
    assert plain.json()["probabilities"] == upload["probabilities"]
    assert data_url.json()["probabilities"] == upload["probabilities"]


def test_base64_errors(server) -> None:
    with server.client() as client:
        invalid = client.post("/predict/base64", json={"image": "not base64 at all!"})
        not_image = client.post("/predict/base64", json={"image": base64.b64encode(b"hello").decode()})
        missing = client.post("/predict/base64", json={"picture": "x"})
        not_json = client.post(
            "/predict/base64", content=b"{oops", headers={"content-type": "application/json"}
        )
        form = client.post("/predict/base64", files={"image": ("a.jpg", b"x", "image/jpeg")})
        huge = client.post("/predict/base64", json={"image": "A" * (15 * 1024 * 1024)})
    assert_error(invalid, 400, "invalid_base64")
    assert_error(not_image, 415, "not_an_image")
    assert_error(missing, 422, "invalid_request")
    assert_error(not_json, 422, "invalid_request")
    assert_error(form, 415, "unsupported_media_type")
    assert_error(huge, 413, "upload_too_large")


def test_the_service_survives_bad_input_quietly(server, photos) -> None:
    """After every kind of bad input it is still ready and right, and each request logged one line."""
    with server.client() as client:
        ids = []
        for data, _, _ in BAD_UPLOADS.values():
            ids.append(post_file(client, data, 'evil"\nname.jpg').headers["x-request-id"])
        good = post_file(client, photos["cat"][4].read_bytes())
        ready = client.get("/ready")
    assert good.status_code == 200 and ready.status_code == 200
    lines = server.log_lines()
    records = [json.loads(line) for line in lines]
    for request_id in ids:
        mine = [r for r in records if r.get("request_id") == request_id]
        assert len(mine) == 1, mine
        assert mine[0]["message"] == "request" and mine[0]["status"] < 500
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not any("Traceback" in line for line in lines)


def test_concurrent_requests_are_batched(server, photos) -> None:
    import concurrent.futures

    data = [p.read_bytes() for p in photos["cat"][:8] + photos["dog"][:8]]

    def one(payload: bytes) -> dict:
        with server.client() as client:
            return post_file(client, payload).json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, data * 2))
    assert all(a["label"] in {"cat", "dog"} for a in answers)
    for first, second in zip(answers[:16], answers[16:], strict=True):
        assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-5)
    with server.client() as client:
        text = client.get("/metrics").text
    sizes = {
        line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("catdog_inference_batch_size_bucket")
    }
    total = float(
        next(
            line for line in text.splitlines() if line.startswith("catdog_inference_batch_size_count")
        ).split()[1]
    )
    assert total - sizes["1.0"] > 0, "no model call ever held more than one image"
    assert np.isfinite(total)
