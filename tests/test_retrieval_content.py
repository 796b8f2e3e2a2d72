"""Retrieval Recall@K with a candidate counted once per content: identical caption strings are one
caption, identical images (one content hash) one image. Where nothing repeats it equals CLIP_benchmark's
`recall_at_k` (the package itself, on the same embeddings); with repeats, hand-computed cases."""

import numpy as np
import pandas as pd
import pytest
import torch
from clip_benchmark.metrics.zeroshot_retrieval import batchify
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as clip_benchmark_recall_at_k

from pipeline.metrics import tasks
from pipeline.metrics.retrieval import ContentMatches, oracle_embeddings, recall_at_k, retrieval_ranks


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_unit(n, d=16, seed=0):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def _clip_benchmark_hits(images, texts, text_image, k, batch_size=7):
    """Per-query hits exactly as CLIP_benchmark's zeroshot_retrieval.evaluate computes them."""
    scores = torch.from_numpy(texts) @ torch.from_numpy(images).t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), torch.from_numpy(text_image)] = True
    t2i = batchify(clip_benchmark_recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0
    i2t = batchify(clip_benchmark_recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0
    return t2i.numpy(), i2t.numpy()


@pytest.mark.parametrize("seed, n_images, per_image", [(0, 30, 3), (1, 50, 5), (2, 17, 1)])
def test_without_repeats_every_query_is_a_hit_exactly_when_clip_benchmark_says_so(seed, n_images, per_image):
    images, texts = _random_unit(n_images, seed=seed), _random_unit(n_images * per_image, seed=seed + 100)
    text_image = np.repeat(np.arange(n_images), per_image)
    # Distinct strings and image keys: building the matches from content gives the same as `distinct`.
    captions = [f"caption {i}" for i in range(len(texts))]
    keys = [f"hash {i}" for i in range(n_images)]
    for matches in (ContentMatches.distinct(text_image, n_images), ContentMatches.build(text_image, captions, keys)):
        ranks = retrieval_ranks(images, texts, matches)
        recalls = ranks.recall((1, 5, 10))
        for k in (1, 5, 10):
            t2i, i2t = _clip_benchmark_hits(images, texts, text_image, k)
            assert ((ranks.text_to_image < k) == t2i).all() and ((ranks.image_to_text < k) == i2t).all()
            assert recalls["text_to_image"][f"R@{k}"] == t2i.mean() and recalls["image_to_text"][f"R@{k}"] == i2t.mean()


def test_a_caption_shared_by_two_images_is_found_through_either():
    images = np.eye(3, dtype=np.float32)  # the scores are the text vectors themselves
    texts = np.array(
        [
            [0.4, 0.9, 0.0],  # image 0's "red": image 1 (also "red") first -> a hit
            [0.5, 0.8, 0.0],  # image 1's "red": image 1 first -> a hit
            [0.0, 0.9, 0.5],  # image 2's "blue": image 1 first, it is not "blue" -> rank 1
        ],
        dtype=np.float32,
    )
    matches = ContentMatches.build([0, 1, 2], ["red", "red", "blue"], ["a", "b", "c"])
    ranks = retrieval_ranks(images, texts, matches)
    assert ranks.text_to_image.tolist() == [0, 0, 1]
    # image -> text: the candidates are "red" (scored by its first row, image 0's) and "blue".
    # image 0: red 0.4 vs blue 0.0 -> 0; image 1: red 0.9 vs blue 0.9, a tie -> 1; image 2: blue 0.5 vs red 0.0 -> 0
    assert ranks.image_to_text.tolist() == [0, 1, 0]
    # Counted per row instead, image 0's "red" loses to image 1, and image 0 to image 1's "red";
    # image 1's own "red" (0.8) is beaten by image 0's copy of the string and by "blue" (0.9 each).
    per_row = retrieval_ranks(images, texts, ContentMatches.distinct([0, 1, 2], 3))
    assert per_row.text_to_image.tolist() == [1, 0, 1] and per_row.image_to_text.tolist() == [1, 2, 0]


def test_identical_images_are_one_candidate_and_share_their_captions():
    # Images 0 and 2 are identical copies (one content hash); each has its own caption.
    images = _unit([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    texts = _unit([[1, 0.1, 0], [0.2, 1, 0], [1, 0, 0.1]])
    matches = ContentMatches.build([0, 1, 2], ["a cat", "a dog", "a kitten"], ["h0", "h1", "h0"])
    assert matches.counts() == {
        "text_to_image": {"n_queries": 3, "n_candidates": 2},
        "image_to_text": {"n_queries": 3, "n_candidates": 3},
    }
    assert matches.merged() == {"repeated_captions": 0, "identical_images": 1}
    ranks = retrieval_ranks(images, texts, matches)
    # The copies do not compete with each other: "a cat" and "a kitten" both find their content first.
    assert ranks.text_to_image.tolist() == [0, 0, 0]
    # Each copy's correct captions are both copies' captions, whichever scores higher.
    assert ranks.image_to_text.tolist() == [0, 0, 0]
    per_row = retrieval_ranks(images, texts, ContentMatches.distinct([0, 1, 2], 3))
    assert per_row.text_to_image.tolist() == [1, 0, 1]  # the copy ties with the caption's own image


def test_different_contents_that_tie_still_count_against_the_model():
    # Two different strings with one embedding (as two captions that differ only past the
    # tokenizer's context length would have): a tie between different candidates is a miss.
    images = np.eye(2, dtype=np.float32)
    texts = _unit([[1, 0], [1, 0]])
    matches = ContentMatches.build([0, 1], ["a long caption ... left", "a long caption ... right"], ["h0", "h1"])
    ranks = retrieval_ranks(images, texts, matches)
    assert ranks.image_to_text.tolist() == [1, 1]  # image 0: both strings tie at 1.0; image 1: both at 0
    assert ranks.text_to_image.tolist() == [0, 1]  # text 1 scores image 0 above its own


@pytest.mark.parametrize("seed", range(4))
def test_ranks_match_a_brute_force_count_over_distinct_contents(seed):
    rng = np.random.default_rng(seed)
    n_images, n_texts = 25, 70
    # Few values: ties everywhere; few strings and hashes: repeats everywhere.
    images = rng.integers(0, 3, size=(n_images, 4)).astype(np.float32)
    texts = rng.integers(0, 3, size=(n_texts, 4)).astype(np.float32)
    text_image = np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_texts - n_images)])
    captions = [f"s{v}" for v in rng.integers(0, 30, n_texts)]
    keys = [f"h{v}" for v in rng.integers(0, 18, n_images)]
    # Copies of one content embed alike, as the same bytes through the same model do.
    first_of_key = {key: i for i, key in reversed(list(enumerate(keys)))}
    images = images[[first_of_key[key] for key in keys]]
    first_of_string = {c: i for i, c in reversed(list(enumerate(captions)))}
    texts = texts[[first_of_string[c] for c in captions]]
    ranks = retrieval_ranks(images, texts, ContentMatches.build(text_image, captions, keys))

    fits = {(captions[t], keys[text_image[t]]) for t in range(n_texts)}
    image_of_key = {key: images[i] for key, i in first_of_key.items()}
    text_of_string = {c: texts[i] for c, i in first_of_string.items()}
    for t in range(n_texts):
        score = {key: float(texts[t] @ vector) for key, vector in image_of_key.items()}
        best = max(score[key] for key in score if (captions[t], key) in fits)
        assert ranks.text_to_image[t] == sum(s >= best for key, s in score.items() if (captions[t], key) not in fits)
    for i in range(n_images):
        score = {c: float(images[i] @ vector) for c, vector in text_of_string.items()}
        best = max(score[c] for c in score if (c, keys[i]) in fits)
        assert ranks.image_to_text[i] == sum(s >= best for c, s in score.items() if (c, keys[i]) not in fits)


def test_a_collapsed_image_tower_is_no_better_than_chance_with_repeated_captions():
    # 40 images, 8 distinct captions each carried by 5 images: chance for text -> image at K is
    # P(one of 5 fitting images among K drawn from 40), and every image ties, so 0 below K = 36.
    n_images = 40
    images = np.tile(_random_unit(1, seed=1), (n_images, 1))
    text_image = np.arange(n_images)
    captions = [f"caption {i % 8}" for i in range(n_images)]
    matches = ContentMatches.build(text_image, captions, [f"h{i}" for i in range(n_images)])
    texts = _random_unit(8, seed=2)[[i % 8 for i in range(n_images)]]
    result = recall_at_k(images, texts, matches, (1, 5, 10))
    assert all(value == 0.0 for value in result["text_to_image"].values())
    # image -> text: one text ranking for every image; it puts K of the 8 strings first, and an
    # image is a hit when its one string is among them: K / 8 of the images, chance exactly.
    assert result["image_to_text"]["R@1"] <= 1 / 8 and result["image_to_text"]["R@5"] <= 5 / 8


def test_the_oracle_scores_one_under_any_repeats():
    rng = np.random.default_rng(5)
    text_image = np.concatenate([np.arange(30), rng.integers(0, 30, 60)])
    matches = ContentMatches.build(text_image, [f"s{v}" for v in rng.integers(0, 20, 90)], [f"h{v}" for v in rng.integers(0, 22, 30)])
    image_emb, text_emb = oracle_embeddings(matches)
    assert recall_at_k(image_emb, text_emb, matches, (1,)) == {"text_to_image": {"R@1": 1.0}, "image_to_text": {"R@1": 1.0}}


def test_matches_refuse_inputs_that_do_not_fit():
    with pytest.raises(ValueError, match="3 caption strings for 2 captions"):
        ContentMatches.build([0, 1], ["a", "b", "c"], ["h0", "h1"])
    with pytest.raises(ValueError, match="caption string or an image content key is missing"):
        ContentMatches.build([0, 1], ["a", None], ["h0", "h1"])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        ContentMatches.build([0, 2], ["a", "b"], ["h0", "h1"])
    matches = ContentMatches.build([0, 0], ["a", "b"], ["h0", "h1"])
    with pytest.raises(ValueError, match="every image needs at least one text"):
        retrieval_ranks(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), matches)
    with pytest.raises(ValueError, match="3 images but 2 image content keys"):
        retrieval_ranks(np.eye(3, dtype=np.float32), np.eye(2, 3, dtype=np.float32), matches)


def test_the_evaluate_task_reports_what_was_merged():
    images = pd.DataFrame(
        {"image_id": ["a", "b", "c", "d"], "split": ["test", "test", "test", "train"], "content_hash": ["h0", "h1", "h0", "h2"]}
    )
    texts = pd.DataFrame(
        {"caption_id": ["a#0", "a#1", "b#0", "c#0", "d#0"], "image_id": ["a", "a", "b", "c", "d"], "caption": ["red", "round", "red", "red", "x"]}
    )
    result = tasks.cross_modal_retrieval(images, np.eye(4, dtype=np.float32), texts, _random_unit(5, 4), "test", [1])
    metrics = result.metrics
    assert metrics["merged"] == {"repeated_captions": 2, "identical_images": 1}
    assert metrics["text_to_image"]["n_queries"] == 4 and metrics["text_to_image"]["n_candidates"] == 2
    assert metrics["image_to_text"]["n_queries"] == 3 and metrics["image_to_text"]["n_candidates"] == 2
    assert metrics["n_images"] == 3 and metrics["n_texts"] == 4
    assert [row["k"] for row in result.plots["recall_at_k"]] == [1, 2]  # up to the distinct images


def test_embeddings_of_other_prepared_data_are_refused_before_any_metric(tmp_path):
    # evaluate joins content hashes and caption strings onto the shards by id: an id the prepared
    # table lacks means the shards were made from other data, and nothing is scored.
    from pipeline.errors import ArtifactError
    from pipeline.evaluate import with_prepared_columns

    prepared = pd.DataFrame({"image_id": ["a", "b"], "content_hash": ["h1", "h2"]})
    joined = with_prepared_columns(pd.DataFrame({"image_id": ["b", "a"]}), prepared, "image_id", ["content_hash"], tmp_path / "emb", tmp_path / "images.parquet")
    assert joined["content_hash"].tolist() == ["h2", "h1"]
    with pytest.raises(ArtifactError, match=r"emb: 1 image_ids not in .*images.parquet \(e.g. 'z'\): .*; rerun `dvc repro embed`"):
        with_prepared_columns(pd.DataFrame({"image_id": ["a", "z"]}), prepared, "image_id", ["content_hash"], tmp_path / "emb", tmp_path / "images.parquet")
