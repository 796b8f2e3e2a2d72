"""Layer probe: truncated towers really stop, features have the documented size, k-NN votes."""

import numpy as np
import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from pipeline import models
from pipeline.metrics.probe import knn_probe, knn_vote, timed_features, topk_from_scores
from pipeline.models.probe import TruncatedTower, point_name, resolve_points, tower_depth


def _vit():
    return _build_vision_tower(32, CLIPVisionCfg(layers=4, width=64, patch_size=8, image_size=32, head_width=32)).eval()


def _resnet():
    return models.create_model(models.TINY_MODEL, "none", "cpu").model.visual.eval()


def _count_calls(blocks):
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda module, inputs, output, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_vit_probe_runs_exactly_k_blocks_and_returns_width_features(depth):
    visual = _vit()
    calls = _count_calls(visual.transformer.resblocks)
    with torch.inference_mode():
        features = TruncatedTower(visual, depth, "cls")(torch.zeros(2, 3, 32, 32))
        mean_pooled = TruncatedTower(visual, depth, "mean")(torch.zeros(2, 3, 32, 32))
    assert calls == list(range(depth)) * 2
    assert features.shape == (2, 64) and mean_pooled.shape == (2, 64)


@pytest.mark.parametrize("depth, channels", [(1, 64), (2, 128), (3, 256), (4, 512)])
def test_resnet_probe_runs_exactly_k_stages_and_returns_stage_channels(depth, channels):
    visual = _resnet()
    stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
    calls = _count_calls(stages + [visual.attnpool])
    with torch.inference_mode():
        features = TruncatedTower(visual, depth)(torch.zeros(2, 3, 64, 64))
    assert calls == list(range(depth))  # the attention pool (index 4) never runs
    assert features.shape == (2, channels)  # width 16 x 4 (bottleneck) x 2^(stage - 1)


def test_points_resolve_per_tower_and_bad_points_name_the_key():
    assert tower_depth(_resnet()) == 4 and tower_depth(_vit()) == 4
    assert resolve_points(["pixels", "half", "penultimate", "final"], 12) == ["pixels", 6, 11, "final"]
    assert [point_name(p) for p in resolve_points(["pixels", 2, "half"], 4)] == ["pixels", "block2"]
    with pytest.raises(ValueError, match="probe.points: 9"):
        resolve_points([9], 4)


def test_knn_vote_counts_neighbours_and_breaks_ties_by_rank():
    neighbour_labels = np.array([[2, 1, 1, 0], [0, 1, 1, 0], [2, 2, 2, 2]])
    votes = knn_vote(neighbour_labels, n_classes=3)
    # second row: classes 0 and 1 tie at 2 votes; class 0's first vote ranks higher, so it wins
    assert votes.argmax(axis=1).tolist() == [1, 0, 2]
    # votes * (k + 1) + (k - rank of the class's nearest neighbour), k = 4; 0 without votes
    assert votes.tolist() == [[1 * 5 + 1, 2 * 5 + 3, 1 * 5 + 4], [2 * 5 + 4, 2 * 5 + 3, 0], [0, 0, 4 * 5 + 4]]
    assert (votes // 5).tolist() == [[1, 2, 1], [2, 2, 0], [0, 0, 4]]
    # labels 1, 1, 0: row 1 is a top-1 hit; row 2 is second, a top-2 hit; row 3's class 0 has no
    # votes and ties with class 1 at 0, so it ranks third: a miss (a tie never helps the model)
    assert topk_from_scores(votes, np.array([1, 1, 0]), ks=(1, 2)) == {"top1": 1 / 3, "top2": 2 / 3}


def test_knn_probe_on_a_hand_made_gallery():
    gallery = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    queries = np.array([[1, 0.05], [0.05, 1], [-1, 0.1]], dtype=np.float32)
    result = knn_probe(gallery, labels, queries, np.array([0, 1, 0]), n_classes=3, k=1, metric="cosine")
    assert result["top1"] == pytest.approx(2 / 3)
    assert result["correct"].tolist() == [True, True, False] and result["query_s"] > 0
    assert result["top1_similarity"][0] == pytest.approx(np.cos(np.arctan(0.05)), abs=1e-5)


def test_timed_features_times_only_the_encoder():
    batches = [torch.ones(4, 3), torch.ones(2, 3)]
    features, seconds = timed_features(lambda x: x * 2, batches, torch.device("cpu"))
    assert features.shape == (6, 3) and np.all(features == 2) and seconds > 0
