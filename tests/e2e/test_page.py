"""The web page at GET /, driven in a real headless Chromium against a real uvicorn process and model."""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from missing_tool import missing_tool
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
# Without the background-networking flags Chromium's own connections are refused by a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chrome logs every HTTP error answer to a fetch as a console error; only these are expected.
HTTP_ERROR_LOG = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")

# Missing: a skip that says why, or under CI (CI=true) a failure: `make test` installs Chromium first.
if CHROMIUM is None:
    missing_tool(
        "Chromium is not installed (no /usr/bin/chromium, no chromium on PATH): run `make browser`",
        allow_module_level=True,
    )
try:
    from playwright import sync_api
except ImportError:
    missing_tool("playwright is not installed: run `make install`", allow_module_level=True)


@dataclass
class Watched:
    """A page with what it logged: console errors, failed requests and HTTP error answers."""

    page: object
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    error_statuses: list[int] = field(default_factory=list)

    def assert_clean(self, *expected: int) -> None:
        """No console error, no failed request, and HTTP errors only with the expected statuses."""
        assert not self.failed_requests, self.failed_requests
        assert set(self.error_statuses) <= set(expected), self.error_statuses
        unexpected = [
            text
            for text in self.console_errors
            if not ((m := HTTP_ERROR_LOG.search(text)) and int(m.group(1)) in expected)
        ]
        assert not unexpected, unexpected


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser) -> Iterator:
    """open_page(server) -> Watched: a fresh context on the server's GET /."""
    contexts = []

    def make(server) -> Watched:
        context = browser.new_context(viewport={"width": 900, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        watched = Watched(page)
        page.on("console", lambda m: watched.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: watched.console_errors.append(f"uncaught: {exc}"))
        page.on("requestfailed", lambda r: watched.failed_requests.append(f"{r.url}: {r.failure}"))
        page.on("response", lambda r: watched.error_statuses.append(r.status) if r.status >= 400 else None)
        response = page.goto(server.url + "/")
        assert response is not None and response.status == 200
        return watched

    yield make
    for context in contexts:
        context.close()


def api_predict(server, data: bytes, name: str = "photo.jpg") -> httpx.Response:
    with server.client() as client:
        return client.post("/predict", files={"file": (name, data, "image/jpeg")})


def wait_for_result(page) -> None:
    page.wait_for_selector("#result:not([hidden]) #bar-cat")


def bar_fraction(page, label: str) -> float:
    """The bar's width as a fraction of its track's."""
    return page.eval_on_selector(
        f"#bar-{label}",
        "bar => bar.getBoundingClientRect().width / bar.parentElement.getBoundingClientRect().width",
    )


def assert_shows(page, body: dict) -> None:
    """The page shows the API's answer: label, both bars and percentages in order, model and latency."""
    assert page.text_content("#label") == body["label"]
    shown = page.eval_on_selector_all("#bars [data-label]", "bars => bars.map(b => b.dataset.label)")
    assert shown == list(body["probabilities"]) == ["cat", "dog"]
    for label, p in body["probabilities"].items():
        assert page.is_visible(f"#bar-{label}") or p < 0.01
        assert bar_fraction(page, label) == pytest.approx(p, abs=0.02)
        assert page.text_content(f"#prob-{label}") == f"{p * 100:.1f}%"
    model = page.text_content("#model")
    assert body["model"]["name"] in model and body["model"]["version"] in model and "ms" in model
    assert page.is_hidden("#error")


def test_pick_a_photo_shows_the_api_answer(server, photos, open_page, tmp_path: Path) -> None:
    photo = photos["cat"][0]
    expected = api_predict(server, photo.read_bytes())
    assert expected.status_code == 200
    watched = open_page(server)
    page = watched.page
    assert page.get_by_label("Choose a photo").get_attribute("accept") == "image/*"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    page.wait_for_selector("#served:has-text('Serving')")
    assert page.is_hidden("#notready")

    page.set_input_files("#file", str(photo))
    wait_for_result(page)
    assert_shows(page, expected.json())
    assert page.is_hidden("#ood")
    assert page.eval_on_selector("#preview", "img => !img.hidden && img.complete && img.naturalWidth > 0")
    assert page.get_attribute("#result", "aria-live") == "polite"

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    with Image.open(io.BytesIO(data)) as image:
        assert image.width >= 800 and len(image.convert("RGB").getcolors(1 << 24)) > 50
    watched.assert_clean()


def test_a_non_pet_picture_shows_the_warning(server, photos, open_page, tmp_path: Path) -> None:
    """A picture that is no cat or dog (skimage.data's coffee cup) gets the out-of-distribution warning; the
    next real pet photo clears it."""
    from catdog import ood

    coffee = ood.save_pictures(ood.skimage_non_pets(("coffee",)), tmp_path)[0]
    watched = open_page(server)
    page = watched.page
    page.set_input_files("#file", str(coffee))
    wait_for_result(page)
    page.wait_for_selector("#ood:not([hidden])")
    assert "does not look like a cat or a dog" in page.text_content("#ood")
    page.set_input_files("#file", str(photos["dog"][1]))
    page.wait_for_selector("#ood", state="hidden")
    watched.assert_clean()


def test_drop_a_photo_on_the_drop_zone(server, photos, open_page) -> None:
    data = photos["dog"][0].read_bytes()
    expected = api_predict(server, data, "dog.jpg").json()
    watched = open_page(server)
    page = watched.page
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
            const zone = document.getElementById("dropzone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
            }
        }""",
        [base64.b64encode(data).decode(), "dog.jpg"],
    )
    wait_for_result(page)
    assert_shows(page, expected)
    assert "over" not in (page.get_attribute("#dropzone", "class") or "")
    watched.assert_clean()


def test_a_text_file_shows_the_api_error(server, open_page, tmp_path: Path) -> None:
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a picture of anything\n")
    expected = api_predict(server, fake.read_bytes())
    assert expected.status_code == 415
    error = expected.json()["error"]
    assert error["code"] == "not_an_image"
    watched = open_page(server)
    page = watched.page

    page.set_input_files("#file", str(fake))
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-code") == "not_an_image"
    assert page.text_content("#error-message") == error["message"]
    assert page.is_hidden("#result") and page.locator("#bars [data-label]").count() == 0
    page.wait_for_function("document.getElementById('status').textContent === ''")
    watched.assert_clean(415)


def test_a_server_without_a_model_says_so(server_factory, photos, open_page, tmp_path: Path) -> None:
    empty = server_factory(tmp_path / "missing" / "model.onnx", wait_ready=False)
    with empty.client() as client:
        assert client.get("/ready").status_code == 503
    watched = open_page(empty)
    page = watched.page
    page.wait_for_selector("#notready:not([hidden])")
    assert "not ready" in page.text_content("#notready")
    assert page.text_content("#notready-detail")

    page.set_input_files("#file", str(photos["cat"][0]))
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-code") == "model_not_ready"
    assert page.text_content("#error-message")
    assert page.is_hidden("#result")
    watched.assert_clean(503)


def test_a_network_failure_is_shown(server, photos, open_page) -> None:
    watched = open_page(server)
    page = watched.page
    page.wait_for_selector("#served:has-text('Serving')")
    page.route("**/predict", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#file", str(photos["cat"][0]))
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error-code") == "network_error"
    assert page.is_hidden("#result")
    assert len(watched.failed_requests) == 1 and "/predict" in watched.failed_requests[0]
    assert not [text for text in watched.console_errors if text.startswith("uncaught")]
