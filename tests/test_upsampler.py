"""The prompt upsampler: short prompts -> descriptive captions that keep what the user said.

Fuller figures (two-object prompts, a longer run) are in `benchmarks/bench_upsampler.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sora import shapes
from sora.upsampler import (PromptUpsampler, UpsamplerConfig, _sentence_case, build_tokenizer, build_upsampler,
                            shapes_pairs, short_prompt, train_upsampler, upsample)

SINGLE = shapes.ClipRanges(two_object_prob=0.0)
ATTRS = ("color", "shape", "size", "motion", "background")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine two threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sentence_case_undoes_lowercase_and_splitting():
    assert _sentence_case("a plain gray scene : a large red circle falls . a small cyan square rises .") == \
        "A plain gray scene: a large red circle falls. A small cyan square rises."
    assert _sentence_case("on a black background , a red circle rises .") == "On a black background, a red circle rises."


def test_short_prompts_parse_back_to_their_clip():
    """The training pairs are consistent: everything a short prompt says is true of its caption."""
    said = {k: 0 for k in ATTRS}
    for i in range(300):
        spec = shapes.sample_clip(5, i)
        prompt = short_prompt(spec, np.random.default_rng(i))
        got, truth = shapes.parse_prompt(prompt), shapes.parse_prompt(spec.caption())
        assert got["color"] == truth["color"] and got["shape"] == truth["shape"], prompt
        for k in ATTRS:
            if got[k] is not None:
                said[k] += 1
                assert got[k] == truth[k], (k, prompt, spec.caption())
    assert min(said.values()) > 30, said  # every optional attribute is said sometimes


def test_tokenizer_is_lowercase_and_ends_in_eos():
    tok = build_tokenizer(["A large red circle falls.", "red circle"])
    a, b = tok("Red Circle")["input_ids"], tok("red circle")["input_ids"]
    assert a == b and a[-1] == tok.eos_token_id and tok.unk_token_id not in a


def test_random_t5_from_dir_greedy_and_seeded_sampling(tmp_path):
    torch.manual_seed(0)
    model, tok = build_upsampler(UpsamplerConfig.preset("debug"), [c for p in shapes_pairs(50, 0) for c in p])
    model.save_pretrained(tmp_path / "u")
    tok.save_pretrained(tmp_path / "u")
    up = PromptUpsampler.from_pretrained(str(tmp_path / "u"), max_new_tokens=8)
    prompts = ["red circle", "blue square moving up", "green triangle"]
    greedy = up.upsample(prompts)
    assert len(greedy) == 3 and all(isinstance(t, str) for t in greedy)
    assert up.upsample(prompts) == greedy  # deterministic
    assert up.upsample(prompts[1:2]) == greedy[1:2]  # batch-invariant (padding is masked)
    state = torch.random.get_rng_state()
    s1, s2, s3 = (up.upsample(prompts * 4, seed=s) for s in (1, 1, 2))
    assert s1 == s2 and s1 != s3  # a seed reproduces its samples; another seed differs
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert upsample(prompts, str(tmp_path / "u"), max_new_tokens=8) == greedy


def test_quick_training_keeps_the_users_attributes(tmp_path, ray_session):
    """A ~10 cpu-second run on single-object pairs, on a Ray Train worker (the loop shape every
    model trains through): colour and shape of unseen prompts survive, and so do size, motion
    and background whenever the prompt names them."""
    from pipelines.train_upsampler import train_upsampler_on_ray

    cfg = UpsamplerConfig(d_model=64, d_ff=128, num_layers=2, num_heads=4, batch_size=32, lr=5e-3,
                          warmup_steps=20, max_steps=250)
    stats = train_upsampler_on_ray(shapes_pairs(1000, 0, ranges=SINGLE), str(tmp_path / "u"), config=cfg,
                                   max_minutes=10.0)
    assert stats["steps"] == 250 and stats["final_loss"] < 0.15 * stats["first_loss"], stats
    names = {p.name for p in (tmp_path / "u").iterdir()}
    assert stats["workers"] == 1 and {"config.json", "model.safetensors", "upsampler.json"} <= names, names
    assert "_train" not in names  # the run's storage is gone, the model dir is clean
    prompts = [p for p, _ in shapes_pairs(120, 99, ranges=SINGLE)]  # another seed: unseen pairs
    outs = upsample(prompts, str(tmp_path / "u"))
    kept = {k: [0, 0] for k in ATTRS}
    for p, o in zip(prompts, outs):
        asked, got = shapes.parse_prompt(p), shapes.parse_prompt(o)
        assert o[0].isupper() and o.endswith("."), o  # a sentence, not a tag
        for k in ATTRS:
            if asked[k] is not None:
                kept[k][0] += asked[k] == got[k]
                kept[k][1] += 1
    rate = {k: a / n for k, (a, n) in kept.items()}
    assert rate["color"] >= 0.95 and rate["shape"] >= 0.95, rate
    assert min(rate.values()) >= 0.85, rate


def test_train_upsampler_in_one_process_writes_a_model_dir(tmp_path):
    pairs = shapes_pairs(64, 0)
    stats = train_upsampler(pairs, str(tmp_path / "u"), preset="debug", max_minutes=5.0)
    assert stats["steps"] == UpsamplerConfig.preset("debug").max_steps and stats["workers"] == 1
    assert stats["final_loss"] < stats["first_loss"]
    assert len(upsample(["red circle"], str(tmp_path / "u"), max_new_tokens=8)) == 1
    with pytest.raises(ValueError, match="at least one"):
        train_upsampler([], str(tmp_path / "none"), preset="debug")
