"""open_clip loading: the tiny config, and errors that say what to do instead."""

import numpy as np
import pytest
import torch

from pipeline import models


def test_tiny_model_is_registered_and_encodes():
    loaded = models.create_model(models.TINY_MODEL, "none", "cpu")
    image = torch.zeros(2, 3, 64, 64)
    tokens = loaded.tokenizer(["a red circle", "a blue square"])
    with torch.inference_mode():
        assert loaded.model.encode_image(image).shape == (2, loaded.embed_dim)
        assert loaded.model.encode_text(tokens).shape == (2, loaded.embed_dim)


def test_unknown_model_and_tag_are_clear_errors():
    with pytest.raises(models.ModelError, match="model.name: unknown model 'ViT-Q-99'"):
        models.resolve_pretrained("ViT-Q-99", "none")
    with pytest.raises(models.ModelError, match="model.pretrained: 'no_such_tag' is not a hub tag for ViT-B-32.*openai"):
        models.resolve_pretrained("ViT-B-32", "no_such_tag")
    with pytest.raises(models.ModelError, match="checkpoint file .*missing.pt not found"):
        models.resolve_pretrained("ViT-B-32", "/nowhere/missing.pt")


def test_hub_weights_without_cache_or_network_fail_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "_hub_weights_cached", lambda name, tag: False)
    with pytest.raises(models.ModelError) as err:
        models.create_model("ViT-B-32", "openai", "cpu")
    message = str(err.value)
    assert "no network" in message and "create_model_and_transforms('ViT-B-32', pretrained='openai')" in message


def test_trained_model_round_trips_through_its_folder(tmp_path):
    torch.manual_seed(0)
    loaded = models.create_model(models.TINY_MODEL, "none", "cpu")
    models.save_trained(tmp_path, loaded, {"method": "none", "checkpoint": "last.pt"}, {"last.pt": {"model": loaded.model.state_dict()}})
    torch.manual_seed(1)  # a different init, so equality below comes from the checkpoint
    again, info = models.load_trained(tmp_path, "cpu")
    assert info["method"] == "none" and not again.model.training
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(models.ModelError, match="CUDA is not available"):
        models.resolve_device("cuda")


def test_texts_tokenised_once_encode_as_texts_tokenised_per_batch():
    """Validation encodes its captions from tokens made once: the same embeddings, bit for bit,
    as tokenising batch by batch, including the last, short batch."""
    from pipeline.models.encode import encode_texts, encode_tokens

    torch.manual_seed(0)
    loaded = models.create_model("clipline-tiny", "none", "cpu")
    texts = [f"a {colour} {shape} on the {side}" for colour in ("red", "blue", "green") for shape in ("circle", "star") for side in ("left", "right")]
    once = encode_tokens(loaded, loaded.tokenizer(texts), batch_size=5)
    per_batch = encode_texts(loaded, texts, batch_size=5)
    assert once.shape == (len(texts), loaded.embed_dim)
    np.testing.assert_array_equal(once, per_batch)
    assert encode_tokens(loaded, loaded.tokenizer([]), batch_size=5).shape == (0, loaded.embed_dim)
