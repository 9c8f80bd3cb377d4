"""A served model and the index of its own weights: built once and cached by sha256, reused only
when it matches, refused when it does not; filtered search never silently short."""

from __future__ import annotations

import numpy as np
import pytest

from lightclip.config import IndexConfig
from lightclip.data.catalogue import Catalogue
from lightclip.index import CatalogueIndex, IndexMismatchError
from lightclip.models.zoo import weights_sha256
from lightclip.service import Filters, ServedModel, ServiceError, load_served
from lightclip.service.engine import CatalogueRows, TextQuery, served_index
from lightclip.service.models import ResolvedModel

from .conftest import INDEX


def resolved(assets, name: str) -> ResolvedModel:
    model_dir = assets / "models" / name
    return ResolvedModel(label=name, version=name, model_dir=model_dir, weights_sha256=weights_sha256(model_dir))


def test_the_index_is_built_once_per_weights_and_reused_only_when_its_sha_matches(svc_assets, tmp_path):
    catalogue = Catalogue.load(svc_assets / "catalogue")
    a, b = resolved(svc_assets, "a"), resolved(svc_assets, "b")
    kwargs = dict(cache_dir=tmp_path / "cache", image_cache_dir=tmp_path / "images")
    index_a, source = served_index(a, catalogue, INDEX, reuse=None, **kwargs)
    assert source.startswith("built into") and index_a.meta["model"]["weights_sha256"] == a.weights_sha256
    again, source = served_index(a, catalogue, INDEX, reuse=None, **kwargs)
    assert source.startswith("cached") and again.ids == index_a.ids
    index_a.save(tmp_path / "models-index")
    _, source = served_index(a, catalogue, INDEX, reuse=tmp_path / "models-index", **kwargs)
    assert source == f"reused {tmp_path / 'models-index'}"
    index_b, source = served_index(b, catalogue, INDEX, reuse=tmp_path / "models-index", **kwargs)  # a's index is not b's
    assert source.startswith("built into") and index_b.meta["model"]["weights_sha256"] == b.weights_sha256
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_model_with_another_models_index_is_refused(svc_assets, served_a):
    b = resolved(svc_assets, "b")
    with pytest.raises(IndexMismatchError, match="refusing to serve them together"):
        ServedModel(b, served_a.embedder, served_a.index, served_a.rows, served_a.vectors)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_filtered_search_is_never_short_whatever_the_index_and_exact_on_flat(svc_assets, tmp_path, kind):
    config = IndexConfig(kind=kind, batch_size=16, eval_queries=0, threads=1, ivf={"nlist": 4, "nprobe": 1, "train_points_per_list": 6},
                         hnsw={"m": 4, "ef_construction": 8, "ef_search": 2})
    served = load_served(resolved(svc_assets, "a"), Catalogue.load(svc_assets / "catalogue"), config, reuse=None,
                         cache_dir=tmp_path / "cache", image_cache_dir=tmp_path / "images")
    items = served.rows.items
    query = served.embed_texts(["red shoes"])
    unit = query[0] / np.linalg.norm(query[0])
    exact_fallbacks = 0
    for column in ("baseColour", "articleType", "gender"):
        for value in items[column].unique():
            mask = (items[column] == value).to_numpy()
            for k in (1, 3, 10):
                outcome = served.search(query, k, Filters({column: value}))
                assert outcome.matching == int(mask.sum())
                assert len(outcome.hits) == min(k, outcome.matching), (column, value, k)
                assert all(items[column].iloc[h.row] == value for h in outcome.hits)
                scores = [h.score for h in outcome.hits]
                assert scores == sorted(scores, reverse=True)
                np.testing.assert_allclose(scores, [served.vectors[h.row] @ unit for h in outcome.hits], atol=1e-5)
                if kind == "flat":  # exact search: the brute-force filtered top-k scores (ties aside)
                    np.testing.assert_allclose(scores, np.sort(served.vectors[mask] @ unit)[::-1][:k], atol=1e-5)
                exact_fallbacks += outcome.index_queries == 0
    # IVF probing 1 list of 4 and a sparse HNSW graph (m 4, ef 2) cannot reach every match even asked for all:
    # those queries were answered by scoring the matches exactly; flat always reaches them
    assert (exact_fallbacks > 0) == (kind != "flat")


def test_rare_filters_re_query_deeper_instead_of_returning_short_lists(served_a):
    items = served_a.rows.items
    value = items["articleType"].value_counts().index[-1]  # the rarest type
    outcome = served_a.search(served_a.embed_texts(["anything"]), 20, Filters({"articleType": value}))
    assert len(outcome.hits) == outcome.matching == int((items["articleType"] == value).sum())
    assert outcome.index_queries >= 1


def test_unknown_filter_columns_and_missing_prices_are_errors_naming_the_field(served_a):
    with pytest.raises(ServiceError) as unknown:
        served_a.search(served_a.vectors[:1], 3, Filters({"fabric": "silk"}))
    assert unknown.value.field == "fabric"
    with pytest.raises(ServiceError) as price:
        served_a.search(served_a.vectors[:1], 3, Filters(price_max=10.0))
    assert price.value.field == "price_max" and "no price" in price.value.message


def test_price_ranges_filter_when_the_catalogue_has_prices(svc_assets, served_a):
    catalogue = Catalogue.load(svc_assets / "catalogue")
    catalogue.items["price"] = [float(10 * i) for i in range(len(catalogue.items))]
    rows = CatalogueRows(catalogue, served_a.index.ids)
    mask = rows.mask(Filters(price_min=50.0, price_max=100.0))
    prices = rows.prices[mask]
    assert len(prices) == 6 and prices.min() >= 50 and prices.max() <= 100
    assert rows.facets()["price"] == {"min": 0.0, "max": 10.0 * (len(catalogue.items) - 1)}


def test_a_batch_of_text_queries_gets_what_each_would_get_alone(served_a):
    """One encoder pass and one index search for the unfiltered queries of a batch, the filtered
    ones searched alone: every answer is the one a query alone gets; a bad filter fails only its query."""
    items = served_a.rows.items
    colour = str(items["baseColour"].iloc[0])
    queries = [TextQuery("red shoes", 3), TextQuery("blue shirt", 10), TextQuery("red shoes", 5, Filters({"baseColour": colour})),
               TextQuery("bag", 1), TextQuery("bag", 4, Filters({"nonsense": "x"})), TextQuery("watch", 100)]
    outcomes = served_a.answer_texts(queries)
    assert isinstance(outcomes[4], ServiceError) and outcomes[4].field == "nonsense"
    for query, outcome in zip(queries, outcomes):
        if query.filters.values.get("nonsense"):
            continue
        alone = served_a.search(served_a.embed_texts([query.text]), query.k, query.filters)
        assert [(h.id, round(h.score, 5)) for h in outcome.hits] == [(h.id, round(h.score, 5)) for h in alone.hits]
        assert outcome.matching == alone.matching
    assert len(outcomes[5].hits) == len(items)  # k above the catalogue: all of it, never more
    assert all(h.attributes["baseColour"] == colour for h in outcomes[2].hits)


def test_a_model_carrying_its_onnx_export_is_served_on_onnx_runtime_over_the_same_index(svc_assets, served_a, tmp_path):
    from lightclip.runtimes import runtime_dir

    catalogue = Catalogue.load(svc_assets / "catalogue")
    exported = runtime_dir(svc_assets / "models" / "a", "onnx", tmp_path / "runtimes")  # a copy of a's dir with onnx/
    carrying = ResolvedModel(label="a+onnx", version="local", model_dir=exported, weights_sha256=weights_sha256(exported))
    kwargs = dict(reuse=None, cache_dir=tmp_path / "index", image_cache_dir=tmp_path / "images")
    served = load_served(carrying, catalogue, INDEX, **kwargs)
    assert served.describe()["runtime"] == "onnx" and served_a.describe()["runtime"] == "torch"
    assert served.weights_sha256 == served_a.weights_sha256 and served.index.ids == served_a.index.ids
    titles = list(catalogue.items["title"][:6])
    on_onnx, on_torch = served.embed_texts(titles), served_a.embed_texts(titles)
    assert float((on_onnx * on_torch).sum(axis=1).min()) >= 0.999
    assert load_served(carrying, catalogue, INDEX, runtime="torch", **kwargs).describe()["runtime"] == "torch"
    on_int8 = load_served(carrying, catalogue, INDEX, runtime="onnx-int8", **kwargs)  # asked for: the export's int8 graphs
    assert on_int8.describe()["runtime"] == "onnx-int8" and on_int8.index.ids == served_a.index.ids
    assert float((on_int8.embed_texts(titles) * on_torch).sum(axis=1).min()) >= 0.99
