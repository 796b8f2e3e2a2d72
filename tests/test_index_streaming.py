"""`index.factory: auto` and the index built from embedding shards read chunk by chunk."""

import faiss
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import index as index_stage
from pipeline import io, preflight
from pipeline.params import Params, ParamsError
from pipeline.params import load as load_params
from pipeline.retrieval import factory, faiss_index

SHARD_SIZES = [700, 13, 0, 1287]  # uneven, with an empty shard


def _vectors(n, dim=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write_shards(folder, vectors, sizes=SHARD_SIZES, splits=None):
    meta = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(vectors))], "path": [f"{i}.png" for i in range(len(vectors))]})
    meta["split"] = splits if splits is not None else "train"
    meta["label"] = pd.array(np.arange(len(vectors)) % 5, dtype="Int64")
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(vectors)
    for part, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        io.write_embedding_shard(folder / f"part-{part:05d}.parquet", meta.iloc[lo:hi], vectors[lo:hi])
    return folder


def _reader(folder, batch_rows=97):
    return lambda: (v for _, v in io.iter_embeddings(folder, batch_rows=batch_rows))


# -- the auto choice ----------------------------------------------------------------------------


def test_auto_picks_flat_then_hnsw_then_ivf_pq_by_size_and_says_why():
    below = factory.choose_factory(factory.FLAT_BELOW - 1, 512)
    assert below.factory == "Flat" and below.search_params == ""
    at = factory.choose_factory(factory.FLAT_BELOW, 512)
    assert at.factory == "HNSW32" and at.search_params == "efSearch=80"
    largest_in_floats = factory.FLOAT_BYTES_MAX // (4 * 512)  # 4Mi vectors of 512 floats = 8 GiB
    assert factory.choose_factory(largest_in_floats, 512).factory == "HNSW32"
    above = factory.choose_factory(largest_in_floats + 1, 512)
    assert above.factory == "IVF4096,PQ128x4fs,Refine(SQ8)" and above.search_params == "nprobe=1024,k_factor_rf=8"
    # The reason names the size and the threshold it was compared with.
    assert "49,999 vectors < 50,000" in below.reason and "50,000 vectors >= 50,000" in at.reason
    assert f"{largest_in_floats + 1:,} vectors" in above.reason and "exceed 8 GiB" in above.reason
    # The dimension sets where compression starts: 4Mi vectors of 128 floats are only 2 GiB.
    assert factory.choose_factory(largest_in_floats + 1, 128).factory == "HNSW32"
    assert factory.choose_factory(10**6, 512, "l2") == factory.choose_factory(10**6, 512, "ip")


def test_auto_hnsw_searches_wider_as_the_gallery_grows():
    assert [factory.hnsw_ef_search(n) for n in (50_000, 100_000, 1_000_000, 4_194_304)] == [80, 96, 192, 304]
    assert all(factory.hnsw_ef_search(n) >= 64 for n in range(factory.FLAT_BELOW, 10**7, 10**5))  # > k, so HNSW finds k


@pytest.mark.parametrize("n", [50_000, 77_777, 199_999, 1_000_000, 30_000_000])
def test_auto_lists_leave_enough_training_points_per_list(n):
    nlist = factory.ivf_lists(n)
    assert nlist & (nlist - 1) == 0  # a power of two
    assert min(n, factory.MAX_TRAIN_POINTS) / nlist >= factory.MIN_POINTS_PER_LIST
    assert nlist >= min(2 * np.sqrt(n), 4096)  # not far below the wiki's 4*sqrt(n)


@pytest.mark.parametrize("dim, codes", [(512, 128), (98, 49), (99, 99)])
def test_auto_pq_codes_divide_the_dimension(dim, codes):
    choice = factory.choose_factory(factory.FLOAT_BYTES_MAX // (4 * dim) + 1, dim)
    assert f",PQ{codes}x4fs," in choice.factory
    faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)  # a valid factory string


def test_auto_search_params_replace_autos_own_or_fail_naming_the_key():
    hnsw = factory.choose_factory(1_000_000, 64)
    assert factory.auto_search_params(hnsw, "", 1_000_000, 64, "ip") == "efSearch=192"
    assert factory.auto_search_params(hnsw, "efSearch=256", 1_000_000, 64, "ip") == "efSearch=256"
    pq = factory.choose_factory(factory.FLOAT_BYTES_MAX // (4 * 64) + 1, 64)
    assert factory.auto_search_params(pq, "k_factor_rf=2", 10**8, 64, "ip") == "nprobe=1024,k_factor_rf=2"
    with pytest.raises(factory.IndexBuildError, match=r"index.search_params 'nprobe=8' does not apply to HNSW32.*nprobe"):
        factory.auto_search_params(hnsw, "nprobe=8", 1_000_000, 64, "ip")
    flat = factory.choose_factory(1200, 64)
    with pytest.raises(factory.IndexBuildError, match=r"index.search_params 'efSearch=64' does not apply to Flat.*1,200 vectors"):
        factory.auto_search_params(flat, "efSearch=64", 1200, 64, "ip")
    with pytest.raises(factory.IndexBuildError, match=r"index.search_params 'efSearch=lots'.*needs a number"):
        factory.auto_search_params(hnsw, "efSearch=lots", 1_000_000, 64, "ip")


def test_preflight_passes_auto_and_refuses_search_params_no_auto_choice_takes():
    params = Params.model_validate({"index": {"factory": "auto", "search_params": ""}})
    preflight.check(params)  # would fail if "auto" were checked as a FAISS factory string
    for fine in ["efSearch=64", "nprobe=32,k_factor_rf=4"]:  # the HNSW's; the IVF-PQ's
        preflight.check(params.model_copy(update={"index": params.index.model_copy(update={"search_params": fine})}))
    for bad, why in [("efSearch=64,nprobe=8", "could not set parameter"), ("quantizer_efSearch=8", "could not set parameter"), ("nprobe", "expected name=value")]:
        wrong = params.model_copy(update={"index": params.index.model_copy(update={"search_params": bad})})
        with pytest.raises(factory.IndexBuildError, match=rf"index.search_params '{bad}'.*{why}"):
            preflight.check(wrong)


# -- streamed build -----------------------------------------------------------------------------


def test_iter_embeddings_reads_what_read_embeddings_reads(tmp_path):
    vectors = _vectors(2000)
    folder = _write_shards(tmp_path / "images", vectors)
    meta, matrix = io.read_embeddings(folder)
    chunks = list(io.iter_embeddings(folder, batch_rows=97))
    assert max(len(m) for m, _ in chunks) == 97
    pd.testing.assert_frame_equal(pd.concat([m for m, _ in chunks], ignore_index=True), meta)
    assert np.array_equal(np.concatenate([v for _, v in chunks]), matrix)
    meta_only = list(io.iter_embeddings(folder, with_vectors=False))
    assert all(v is None for _, v in meta_only)
    pd.testing.assert_frame_equal(pd.concat([m for m, _ in meta_only], ignore_index=True), meta)


@pytest.mark.parametrize("factory_string, search_params", [("Flat", ""), ("IVF32,Flat", "nprobe=4"), ("IVF16,PQ4x4", "nprobe=4"), ("HNSW16", "efSearch=32")])
def test_streamed_build_equals_the_in_memory_build(tmp_path, monkeypatch, factory_string, search_params):
    # Small add blocks and training sample, so that both cross chunk boundaries.
    monkeypatch.setattr(faiss_index, "ADD_CHUNK_ROWS", 300)
    monkeypatch.setattr(faiss_index, "MAX_TRAIN_POINTS", 1500)
    vectors = _vectors(2000)
    folder = _write_shards(tmp_path / "images", vectors)
    streamed, _ = faiss_index.build_from_chunks(_reader(folder), 2000, 16, factory_string, "ip", seed=3)
    in_memory, _ = faiss_index.build(vectors, factory_string, "ip", seed=3)
    assert faiss.serialize_index(streamed).tobytes() == faiss.serialize_index(in_memory).tobytes()
    for index in (streamed, in_memory):
        faiss_index.apply_search_params(index, search_params)
    queries = _vectors(50, seed=1)
    assert np.array_equal(faiss_index.search(streamed, queries, 10)[1], faiss_index.search(in_memory, queries, 10)[1])


def test_streamed_training_sample_is_the_seeded_sample_of_the_whole_matrix(monkeypatch):
    monkeypatch.setattr(faiss_index, "MAX_TRAIN_POINTS", 500)
    vectors = _vectors(2000)
    chunks = [vectors[:700], vectors[700:713], vectors[713:]]
    sample = faiss_index.train_sample(lambda: chunks, 2000, 16, seed=5)
    # What indexing the whole matrix with the seeded draw gives, in the draw's order (k-means depends on it).
    assert np.array_equal(sample, vectors[np.random.default_rng(5).choice(2000, 500, replace=False)])


def test_chunked_exact_recall_equals_the_full_matrix_recall(monkeypatch):
    monkeypatch.setattr(faiss_index, "ADD_CHUNK_ROWS", 256)  # exact neighbours merged over 8 blocks
    vectors, queries = _vectors(2000), _vectors(60, seed=1)
    ivf, _ = faiss_index.build(vectors, "IVF32,Flat")
    faiss_index.apply_search_params(ivf, "nprobe=2")
    chunked = faiss_index.ann_quality(ivf, iter([vectors[:700], vectors[700:713], vectors[713:]]), queries, "ip")
    # The measurement as it was: one exact index over every vector.
    exact = faiss.IndexFlatIP(16)
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    _, found = ivf.search(queries, 10)
    full = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert 0 < chunked["recall@10"] < 1 and chunked["recall@10"] == pytest.approx(full, abs=1e-12)


# -- the index stage ----------------------------------------------------------------------------


def _run_index(tmp_path, index_params, embeddings):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"index": index_params}))
    out = tmp_path / "index"
    # What embed writes beside the shards: index checks their rows against its count.
    n_images = sum(len(meta) for meta, _ in io.iter_embeddings(embeddings / "images", with_vectors=False))
    io.write_json(embeddings / "embed.json", {"n_images": n_images, "n_texts": 0})
    args = ["--params", params_file, "--embeddings", embeddings, "--out", out, "--timing", tmp_path / "timing.json"]
    return CliRunner().invoke(index_stage.app, [str(a) for a in args]), out


def test_index_stage_with_auto_records_its_choice_and_searches_with_it(tmp_path):
    n = factory.FLAT_BELOW  # the smallest gallery auto builds an HNSW for
    splits = np.where(np.arange(n) % 100 == 0, "test", "train")
    _write_shards(tmp_path / "emb" / "images", _vectors(n, dim=8), sizes=[20_000, 30_000], splits=splits)
    result, out = _run_index(tmp_path, {"factory": "auto", "search_params": ""}, tmp_path / "emb")
    assert result.exit_code == 0, result.output
    info = io.read_json(out / "index.json")
    assert info["factory"] == "auto" and info["factory_chosen"] == "HNSW32" and info["search_params"] == "efSearch=80"
    assert "50,000 vectors >= 50,000" in info["factory_reason"]
    assert info["n"] == n and info["n_queries"] == 500 and 0 < info["recall@10"] <= 1
    loaded = faiss_index.load(out)
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 80  # what index.json says is what searches
    assert list(loaded.ids["image_id"][:3]) == ["img0", "img1", "img2"]


def test_index_stage_writes_the_id_map_of_the_whole_table_byte_for_byte(tmp_path):
    # Built from metadata read apart from the vectors, the id map is still the file the stage wrote
    # when it read everything at once: Parquet's bytes depend on how the columns are chunked, here
    # (enough ids to outgrow a dictionary page) if they were read in record batches.
    n = 100_000
    splits = np.where(np.arange(n) % 3 == 0, "val", "train")
    folder = _write_shards(tmp_path / "emb" / "images", _vectors(n, dim=2), sizes=[50_000, 13, 0, 49_987], splits=splits)
    result, out = _run_index(tmp_path, {"factory": "Flat", "search_params": "", "gallery_splits": ["train"]}, tmp_path / "emb")
    assert result.exit_code == 0, result.output
    meta, _ = io.read_embeddings(folder)
    io.write_parquet(tmp_path / "expected.parquet", meta[meta["split"] == "train"].reset_index(drop=True))
    assert (out / "ids.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()


def test_index_stage_with_auto_refuses_search_params_the_chosen_index_lacks(tmp_path):
    _write_shards(tmp_path / "emb" / "images", _vectors(2000), splits=np.where(np.arange(2000) % 10 == 0, "test", "train"))
    result, _ = _run_index(tmp_path, {"factory": "auto", "search_params": "efSearch=64"}, tmp_path / "emb")
    assert result.exit_code == 1
    assert "index.search_params 'efSearch=64' does not apply to Flat, the index that index.factory auto chose for 2,000 vectors" in result.output


def test_quality_queries_are_capped_evenly():
    flags = np.zeros(100, dtype=bool)
    flags[10:60] = True
    kept = index_stage.at_most(flags, 5)
    assert list(np.flatnonzero(kept)) == [10, 22, 34, 47, 59]
    assert index_stage.at_most(flags, 50) is flags


def test_auto_in_another_case_is_refused_naming_the_key(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"index": {"factory": "Auto"}}))
    with pytest.raises(ParamsError, match=r"index.factory: .*write `auto`"):
        load_params(params_file)
