"""CLIP scores: aesthetic (a linear head on image embeddings) and caption alignment, through the
real from_pretrained path of a tiny CLIP built from a config; no model -> no score."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from footage import scene, tiny_clip_dir
from sora.curation.clip_scores import ClipScorer, aesthetic_or_none, alignment_or_none, save_aesthetic_head

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return tiny_clip_dir(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def reference_embeddings(clip_dir: str, frames: np.ndarray, caption: str):
    """CLIP's own forward pass: (normalised image embeddings (T, D), text embedding (D,))."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=list(frames), return_tensors="pt")["pixel_values"]
    ids = AutoTokenizer.from_pretrained(clip_dir)([caption], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    return out.image_embeds, out.text_embeds[0]


def test_no_model_means_no_score(tmp_path):
    frames = scene(64, 36, 2)
    assert aesthetic_or_none(None, frames) is None
    assert alignment_or_none(None, frames, "a red ball") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer(str(tmp_path / "missing"))


def test_aesthetic_is_the_head_on_clips_own_image_embeddings(clip_dir):
    from safetensors.torch import load_file

    frames = scene(96, 54, 3, seed=4)
    scorer = ClipScorer(clip_dir)
    images, _ = reference_embeddings(clip_dir, frames, "a")
    head = load_file(os.path.join(clip_dir, "aesthetic_head.safetensors"))
    want = float((images @ head["weight"][0] + head["bias"][0]).mean())
    assert scorer.aesthetic(frames) == pytest.approx(want, abs=1e-5)
    assert aesthetic_or_none(scorer, frames) == pytest.approx(want, abs=1e-5)


def test_a_head_pointing_at_a_look_prefers_it(clip_dir, tmp_path):
    """The head scores along its direction: aimed at one shot's embedding, it ranks that shot
    above another."""
    liked, other = scene(96, 54, 2, seed=5), scene(96, 54, 2, seed=6)
    d = str(tmp_path / "aimed")
    shutil.copytree(clip_dir, d)
    direction = ClipScorer(clip_dir).image_embeddings(liked).mean(0)
    save_aesthetic_head(d, direction[None], torch.zeros(1))
    aimed = ClipScorer(d)
    assert aimed.aesthetic(liked) > aimed.aesthetic(other)


def test_alignment_is_clips_text_image_cosine(clip_dir):
    frames = scene(96, 54, 3, seed=7)
    scorer = ClipScorer(clip_dir)
    for caption in ("a red ball over green field", "blue sky at night"):
        images, text = reference_embeddings(clip_dir, frames, caption)
        mean = torch.nn.functional.normalize(images.mean(0), dim=-1)
        got = scorer.alignment(frames, caption)
        assert got == pytest.approx(float(mean @ text), abs=1e-5) and -1 <= got <= 1
    assert scorer.alignment(frames, "a red ball") != pytest.approx(scorer.alignment(frames, "city at night"))
    assert alignment_or_none(scorer, frames, None) is None


def test_a_malformed_head_is_a_clear_error(clip_dir, tmp_path):
    d = str(tmp_path / "bad")
    shutil.copytree(clip_dir, d)
    save_aesthetic_head(d, torch.zeros(1, 7), torch.zeros(1))
    with pytest.raises(ValueError, match=r"weight \(1, 16\)"):
        ClipScorer(d)
