"""Shared fixtures: telemetry off, tool homes in temp dirs, tiny catalogues, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightclip.env import configure_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Before any library import that reads these: nothing phones home, nothing writes into ~.
    tmp_home = Path(os.environ.get("LIGHTCLIP_TEST_HOME", "/tmp/lightclip-test-home"))
    os.environ.setdefault("PREFECT_HOME", str(tmp_home / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(tmp_home / "matplotlib"))
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(tmp_home / "dvc-site-cache"))
    configure_environment()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``LIGHTCLIP_SHARED`` (default ``../shared`` beside the repo)."""
    return Path(os.environ.get("LIGHTCLIP_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def real_catalogue_dir(shared_dir: Path) -> Path:
    """The real Kaggle-layout catalogue; tests that need it skip cleanly when it is absent."""
    path = shared_dir / "datasets" / "fashion-product-images"
    if not (path / "styles.csv").is_file() or not (path / "images").is_dir():
        pytest.skip(f"shared real catalogue not found at {path} (set LIGHTCLIP_SHARED)")
    return path


def make_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 48, fmt: str = "PNG") -> Path:
    """Write a small solid image with a distinct mark so different colours hash differently."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size // 2, size // 2], fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    image.save(path, format=fmt)
    return path


@pytest.fixture
def tiny_catalogue(tmp_path: Path):
    """Factory: ``tiny_catalogue(n=12, **overrides)`` -> a saved, valid Catalogue of n items."""
    from lightclip.data.catalogue import new_catalogue

    colours = ["Red", "Blue", "Green", "Black", "White", "Yellow", "Pink", "Grey"]
    types = [("Tshirts", "Topwear", "Apparel"), ("Dresses", "Dress", "Apparel"), ("Casual Shoes", "Shoes", "Footwear"), ("Handbags", "Bags", "Accessories")]

    def build(n: int = 12, root: Path | None = None) -> "Catalogue":  # noqa: F821
        root = root or tmp_path / "catalogue"
        records = []
        for i in range(n):
            article, sub, master = types[i % len(types)]
            colour = colours[i % len(colours)]
            make_image(root / "images" / f"{i}.png", colour=((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            records.append(
                {
                    "id": str(1000 + i),
                    "image": f"images/{i}.png",
                    "title": f"Brand{i % 3} Women {colour} {article} {i}",
                    "gender": "Women",
                    "masterCategory": master,
                    "subCategory": sub,
                    "articleType": article,
                    "baseColour": colour,
                    "season": "Summer",
                    "year": 2015,
                    "usage": "Casual",
                }
            )
        return new_catalogue(root, records)

    return build


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect against a temporary server and database for the whole session (started on first use).

    Prefect's own test harness: one subprocess server (about 8 s to start here), shared by every
    flow test, so that no test needs ``PREFECT_API_URL`` or writes into the user's Prefect home.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
