"""bench/recipe_screen.py's model edits: the README's recipe table was made with them."""

import importlib.util
from pathlib import Path

import open_clip
import pytest
import typer

from pipeline import models


@pytest.fixture(scope="module")
def screen():
    path = Path(__file__).resolve().parents[1] / "bench" / "recipe_screen.py"
    spec = importlib.util.spec_from_file_location("recipe_screen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_set_edits_a_copy_of_the_config_and_the_model_is_built_from_it(screen):
    name = screen.model_with(models.TINY_MODEL, ["text_cfg.width=64", "text_cfg.heads=2", "init_logit_scale=3.5"])
    edited = open_clip.get_model_config(name)
    assert edited["text_cfg"]["width"] == 64 and edited["init_logit_scale"] == 3.5
    assert open_clip.get_model_config(models.TINY_MODEL)["text_cfg"]["width"] == 128  # the original is untouched
    loaded = models.create_model(name, "none", "cpu")
    assert loaded.model.token_embedding.embedding_dim == 64
    assert loaded.model.logit_scale.item() == pytest.approx(3.5)
    assert screen.model_with(models.TINY_MODEL, []) == models.TINY_MODEL


@pytest.mark.parametrize(
    "setting, message",
    [
        ("text_cfg.width", "is not KEY=JSON"),
        ("txt_cfg.width=64", "has no section 'txt_cfg'"),
        ("text_cfg.width=sixty", "is not JSON"),
    ],
)
def test_model_set_errors_name_the_setting(screen, setting, message):
    with pytest.raises(typer.BadParameter, match=message):
        screen.model_with(models.TINY_MODEL, [setting])
