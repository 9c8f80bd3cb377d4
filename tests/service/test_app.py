"""The HTTP API in-process (FastAPI's TestClient): answers, filters, 4xx errors naming the field,
metrics, readiness, and the image route's path checks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lightclip.service import create_app, safe_image_path


@pytest.fixture
def client(local_state) -> TestClient:
    with TestClient(create_app(local_state), raise_server_exceptions=False) as c:
        yield c


def png_bytes(colour=(200, 30, 30), size=40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_search_returns_the_indexs_ranking_with_model_and_latency(client, served_a):
    title = served_a.index.titles[3]
    body = client.get("/search", params={"q": title, "k": 5}).json()
    assert body["count"] == 5 and [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    expected = served_a.search(served_a.embedder.embed_texts([title]), 5)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected.hits]
    assert body["model"]["version"] == "local" and body["model"]["weights_sha256"] == served_a.weights_sha256
    assert body["latency_ms"] > 0 and body["results"][0]["image"] == f"/images/{body['results'][0]['id']}"
    assert body["note"] is None and body["matching"] == len(served_a.index)


def test_filters_apply_to_every_result_and_say_when_fewer_exist(client, served_a):
    items = served_a.rows.items
    colour = items["baseColour"].value_counts().index[0]
    n_colour = int((items["baseColour"] == colour).sum())
    body = client.get("/search", params={"q": "shoes", "k": 20, "baseColour": colour.lower()}).json()
    assert all(r["baseColour"] == colour for r in body["results"])
    assert body["count"] == n_colour == body["matching"] and body["note"] == f"only {n_colour} product(s) match these filters"
    gender = items["gender"].iloc[0]
    both = client.get("/search", params={"q": "shoes", "k": 3, "gender": gender, "baseColour": colour}).json()
    assert all(r["gender"] == gender and r["baseColour"] == colour for r in both["results"])
    none = client.get("/search", params={"q": "shoes", "baseColour": "no such colour"}).json()
    assert none["count"] == 0 and none["note"].startswith("only 0 product(s)")


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"q": ""}, 400, "q"),
        ({"q": "   "}, 400, "q"),
        ({"q": "x" * 101}, 400, "q"),
        ({"q": "dress", "k": 0}, 400, "k"),
        ({"q": "dress", "k": 21}, 400, "k"),
        ({"q": "dress", "k": "many"}, 422, "k"),
        ({"q": "dress", "colour": "Red"}, 400, "colour"),
        ({"q": "dress", "price_min": 10}, 400, "price_min"),
    ],
)
def test_bad_queries_are_4xx_json_naming_the_field(client, params, status, field):
    response = client.get("/search", params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and "Traceback" not in response.text


def test_image_upload_searches_by_the_images_embedding(client, served_a, svc_assets):
    data = (svc_assets / "catalogue" / served_a.rows.items["image"].iloc[7]).read_bytes()
    body = client.post("/search/image", files={"image": ("x.png", data, "image/png")}, params={"k": 3}).json()
    assert body["count"] == 3 and body["query"] == "x.png"
    assert body["results"][0]["id"] == served_a.index.ids[7]  # an item's own image finds the item first
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_bad_uploads_are_refused_naming_the_image_field(client):
    undecodable = client.post("/search/image", files={"image": ("x.png", b"not an image at all", "image/png")})
    assert undecodable.status_code == 400 and undecodable.json()["error"]["field"] == "image"
    for size in (200_001, 5_000_000):  # just over the limit (read, then refused) and far over it (refused by its length)
        too_big = client.post("/search/image", files={"image": ("x.png", os.urandom(size), "image/png")})
        assert too_big.status_code == 413 and too_big.json()["error"]["field"] == "image"
    missing = client.post("/search/image")
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "image"
    ok = client.post("/search/image", files={"image": ("red.png", png_bytes(), "image/png")})
    assert ok.status_code == 200 and ok.json()["count"] == 5
    # both refusals are counted under their endpoint, the one refused by its length before any route ran too
    assert 'lightclip_requests_total{endpoint="/search/image",method="POST",status="413"} 2.0' in client.get("/metrics").text


def test_similar_excludes_the_item_itself_and_unknown_ids_are_404(client, served_a):
    item = served_a.index.ids[2]
    body = client.get(f"/similar/{item}", params={"k": 4}).json()
    assert body["count"] == 4 and item not in [r["id"] for r in body["results"]] and body["title"] == served_a.index.titles[2]
    expected = served_a.search(served_a.vectors[2:3], 5)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected.hits if h.id != item][:4]
    unknown = client.get("/similar/no-such-id")
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "id"


def test_health_readiness_and_metrics(client, served_a):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["model"]["weights_sha256"] == served_a.weights_sha256
    for _ in range(3):
        client.get("/search", params={"q": "blue shirt"})
    client.get("/search", params={"q": ""})
    text = client.get("/metrics").text
    assert 'lightclip_requests_total{endpoint="/search",method="GET",status="200"} 3.0' in text
    assert 'lightclip_requests_total{endpoint="/search",method="GET",status="400"} 1.0' in text
    assert 'lightclip_request_seconds_count{endpoint="/search"} 4.0' in text
    assert f'lightclip_model_info{{label="{served_a.label}",version="local",weights_sha256="{served_a.weights_sha256}"}} 1.0' in text
    assert f"lightclip_index_items {float(len(served_a.index))}" in text
    assert "lightclip_text_batch_size_count 3.0" in text and "lightclip_text_batch_seconds_count 3.0" in text


def test_readyz_is_503_when_the_index_does_not_record_the_models_weights(client, served_a, monkeypatch):
    monkeypatch.setitem(served_a.index.meta["model"], "weights_sha256", "0" * 64)
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["ready"] is False


def test_an_unexpected_error_is_a_500_without_a_traceback(client, served_a, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(served_a, "embed_texts", broken)
    response = client.get("/search", params={"q": "dress"})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text and response.json()["error"]["message"]


def test_the_page_the_docs_and_product_images(client, served_a, svc_assets):
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200 and "/search/image" in client.get("/openapi.json").text
    image = client.get(f"/images/{served_a.index.ids[0]}")
    assert image.status_code == 200 and image.content == (svc_assets / "catalogue" / served_a.rows.items["image"].iloc[0]).read_bytes()


@pytest.mark.parametrize("path", ["/images/..%2F..%2Fcatalogue.parquet", "/images/%2e%2e%2fetc%2fpasswd", "/images/%2e%2e",
                                  "/images/..%5C..%5Ccatalogue.parquet", "/static/..%2F..%2F__init__.py", "/static/%2e%2e/app.py"])
def test_no_path_traversal_through_the_image_and_static_routes(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert b"PAR1" not in response.content and b"import" not in response.content


def test_safe_image_path_refuses_anything_outside_the_image_root(tmp_path: Path):
    images = tmp_path / "catalogue" / "images"
    images.mkdir(parents=True)
    inside = images / "a.png"
    inside.write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (images / "link.png").symlink_to(secret)
    (images / "notes.txt").write_text("not an image")
    assert safe_image_path(inside, images) == inside.resolve()
    assert safe_image_path(images / ".." / ".." / "secret.png", images) is None
    assert safe_image_path(images / "link.png", images) is None  # a symlink out of the root
    assert safe_image_path(images / "notes.txt", images) is None
    assert safe_image_path(images / "missing.png", images) is None


def test_the_image_root_is_the_deepest_directory_holding_every_image(served_a, svc_assets):
    assert served_a.rows.image_root == (svc_assets / "catalogue" / "images").resolve()
