"""FAISS build/search, the ANN-vs-exact measurement, and errors that name the param."""

import numpy as np
import pandas as pd
import pytest

from pipeline.retrieval import faiss_index


def _vectors(n=300, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF8,Flat", "IVF4,PQ4"])
def test_factories_build_and_find_an_exact_copy_first(factory):
    vectors = _vectors()
    index, build_s = faiss_index.build(vectors, factory, "ip")
    faiss_index.apply_search_params(index, "nprobe=8" if factory.startswith("IVF") else "")
    assert index.ntotal == 300 and build_s >= 0
    _, rows = faiss_index.search(index, vectors[:20], 5)
    assert (rows[:, 0] == np.arange(20)).mean() >= (0.8 if "PQ" in factory else 1.0)


def test_ann_quality_is_one_for_exact_search_and_lower_for_a_coarse_ivf():
    vectors, queries = _vectors(), _vectors(50, seed=1)
    flat, _ = faiss_index.build(vectors, "Flat")
    assert faiss_index.ann_quality(flat, vectors, queries, "ip")["recall@10"] == 1.0
    ivf, _ = faiss_index.build(vectors, "IVF16,Flat")
    faiss_index.apply_search_params(ivf, "nprobe=1")
    quality = faiss_index.ann_quality(ivf, vectors, queries, "ip")
    assert 0.0 < quality["recall@10"] < 1.0 and quality["n_queries"] == 50 and quality["qps"] > 0


def test_ivf_with_more_lists_than_vectors_names_the_param():
    with pytest.raises(faiss_index.IndexBuildError, match=r"index.factory 'IVF512,Flat'.*300"):
        faiss_index.build(_vectors(), "IVF512,Flat")


def test_bad_factory_and_search_params_name_the_param():
    with pytest.raises(faiss_index.IndexBuildError, match="index.factory 'NotAnIndex'"):
        faiss_index.build(_vectors(), "NotAnIndex")
    index, _ = faiss_index.build(_vectors(), "Flat")
    with pytest.raises(faiss_index.IndexBuildError, match="index.search_params"):
        faiss_index.apply_search_params(index, "nprobe=oops")


def test_saved_index_maps_rows_back_to_image_ids(tmp_path):
    vectors = _vectors(40)
    ids = pd.DataFrame({"image_id": [f"img{i}" for i in range(40)], "path": [f"{i}.png" for i in range(40)]})
    index, _ = faiss_index.build(vectors, "HNSW16")
    faiss_index.save(tmp_path, index, ids, {"factory": "HNSW16", "search_params": "efSearch=32"})
    loaded = faiss_index.load(tmp_path)
    hits = loaded.search(vectors[7], k=3)
    assert len(hits) == 1 and hits[0]["image_id"].iloc[0] == "img7"
    assert hits[0]["score"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert list(hits[0]["score"]) == sorted(hits[0]["score"], reverse=True)
