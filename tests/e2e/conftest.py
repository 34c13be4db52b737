"""The e2e tests' service: a real uvicorn process over a real exported model (tests/service_process.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from service_process import Server


@pytest.fixture(scope="session")
def server(exported_model: Path, server_factory: Callable[..., Server]) -> Server:
    """The service on the exported fp32 model (the e2e tests' default)."""
    return server_factory(exported_model / "model.onnx", MODEL_PRECISION="fp32")


@pytest.fixture(scope="session")
def photos(sample_images_dir: Path) -> dict[str, list[Path]]:
    """Real photos of the shared sample by class (the last ones: never in the tiny training set)."""
    return {
        label: sorted((sample_images_dir / "PetImages" / folder).glob("*.jpg"))[-20:]
        for label, folder in (("cat", "Cat"), ("dog", "Dog"))
    }
