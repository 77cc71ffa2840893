"""The recaptioner: frame sampling and grids, loading any HF image-text-to-text model from a
local dir, and our own LLaVA captioner's train -> save -> load round trip.

The 8-minute accuracy run on the shapes world is `benchmarks/bench_captioner.py`, not a test.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from sora import shapes
from sora.captioner import (Captioner, CaptionerConfig, bag_of_words_loss, bag_of_words_targets,
                            build_captioner, build_tokenizer, encode_clips, fit_captioner, flip_grid, frame_grid,
                            grid_shape, mirror_word_ids, sample_frame_indices, save_captioner, tag_loss,
                            tag_targets, train_captioner)


def _clips(n: int, seed: int = 3) -> list[tuple[np.ndarray, str]]:
    specs = [shapes.sample_clip(seed, i, ranges=shapes.TINY) for i in range(n)]
    return [(shapes.render(s), s.caption()) for s in specs]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared machine two
    OpenMP threads wait on each other: 60 steps took 200 s with 2 threads, 5 s with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips():
    return _clips(48)


# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------


def test_sample_frame_indices_spread_evenly():
    assert sample_frame_indices(9, 4).tolist() == [0, 3, 5, 8]  # rint(0, 8/3, 16/3, 8)
    assert sample_frame_indices(17, 2).tolist() == [0, 16]  # first and last: the whole motion
    assert sample_frame_indices(9, 1).tolist() == [4]  # one frame: the middle one
    short = sample_frame_indices(3, 5)  # more frames asked than exist: repeats, stays in range
    assert short[0] == 0 and short[-1] == 2 and (np.diff(short) >= 0).all() and len(short) == 5
    with pytest.raises(AssertionError):
        sample_frame_indices(0, 4)


def test_frame_grid_layout():
    T, H, W = 9, 6, 10
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[..., 0] = np.arange(T, dtype=np.uint8)[:, None, None] * 20  # frame t is 20 t in red
    frames[:, 0, 0, 1] = 255  # a marker in the top-left corner of every frame
    grid = frame_grid(frames, k=4)
    assert grid.shape == (2 * H, 2 * W, 3)
    for cell, t in enumerate([0, 3, 5, 8]):  # time order: left to right, then top to bottom
        r, c = divmod(cell, 2)
        np.testing.assert_array_equal(grid[r * H:(r + 1) * H, c * W:(c + 1) * W], frames[t])
    # k = 3 in a 2x2 grid: the last cell is black.
    assert grid_shape(3) == (2, 2) and grid_shape(2) == (1, 2) and grid_shape(9) == (3, 3)
    g3 = frame_grid(frames, k=3)
    assert (g3[H:, W:] == 0).all() and (g3[H:, :W] == frames[8]).all()
    # Big frames are shrunk with their aspect kept before tiling.
    big = np.zeros((2, 300, 600, 3), np.uint8)
    assert frame_grid(big, k=2, max_tile=224).shape == (112, 448, 3)
    assert frame_grid(big, k=2, max_tile=None).shape == (300, 1200, 3)


def test_frame_interleave_layout_puts_each_place_of_every_frame_side_by_side():
    T, H, W = 9, 6, 10
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    img = frame_grid(frames, k=4, layout="interleave")
    assert img.shape == (2 * H, 2 * W, 3)
    for cell, t in enumerate([0, 3, 5, 8]):  # frame i at offset (i // 2, i % 2) of every 2x2 block
        r, c = divmod(cell, 2)
        np.testing.assert_array_equal(img[r::2, c::2], frames[t])
    # the same frames as the grid layout, only rearranged; `tile` sizes the frames first
    assert sorted(img.ravel()) == sorted(frame_grid(frames, k=4).ravel())
    assert frame_grid(frames, k=4, layout="interleave", tile=(16, 16)).shape == (32, 32, 3)


def test_interleave_key_layout_adds_the_first_frame_alone_at_full_size():
    T, H, W = 9, 6, 10
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    # Tiles of half the frame: the interleaved half is H x W, so the key frame needs no resize.
    img = frame_grid(frames, k=4, layout="interleave+key", tile=(H // 2, W // 2))
    assert img.shape == (H, 2 * W, 3)
    np.testing.assert_array_equal(img[:, :W], frame_grid(frames, k=4, layout="interleave", tile=(H // 2, W // 2)))
    np.testing.assert_array_equal(img[:, W:], frames[0])  # from the full frame, not from its tile
    assert frame_grid(frames, k=4, layout="interleave+key", tile=(16, 16)).shape == (32, 64, 3)


@pytest.mark.parametrize("layout", ["grid", "interleave", "interleave+key"])
def test_flip_grid_mirrors_each_frame_and_keeps_time_order(layout):
    """Mirroring the grid image equals building the grid from mirrored frames."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (9, 6, 10, 3), dtype=np.uint8)
    for k in (4, 3):  # a full 2x2 grid, and one with a black cell
        img = torch.from_numpy(frame_grid(frames, k=k, layout=layout)).permute(2, 0, 1)  # (3, H, W)
        want = frame_grid(frames[:, :, ::-1].copy(), k=k, layout=layout)
        np.testing.assert_array_equal(flip_grid(img, k, layout).permute(1, 2, 0).numpy(), want)
        np.testing.assert_array_equal(flip_grid(flip_grid(img, k, layout), k, layout).numpy(), img.numpy())


def test_mirror_word_ids_swaps_left_and_right_in_captions():
    caps = ["A small red circle moves from right to left.", "A large blue square slides rightward.",
            "On a black background, a large red circle drifts to the right. A small cyan square slides leftward.",
            "A bright square slides leftward."]  # "bright" is not a direction
    tok = build_tokenizer(caps)
    perm = mirror_word_ids(tok)
    def mirrored(c):
        return tok.decode(perm[torch.tensor(tok(c, add_special_tokens=False)["input_ids"])].tolist())
    assert mirrored(caps[0]) == "A small red circle moves from left to right."
    assert mirrored(caps[2]) == ("On a black background, a large red circle drifts to the left. "
                                 "A small cyan square slides rightward.")
    assert mirrored(caps[3]) == "A bright square slides rightward."
    # "left" never occurs alone in these captions: the tokenizer adds the mirror words itself
    assert tok.unk_token_id not in tok("from left to right", add_special_tokens=False)["input_ids"]
    assert torch.equal(perm[perm], torch.arange(len(tok)))
    for c in caps:  # and the parser reads the mirrored motion as the opposite direction
        want = {"left": "right", "right": "left"}.get(shapes.parse_prompt(c)["motion"])
        assert shapes.parse_prompt(mirrored(c))["motion"] == want


# ----------------------------------------------------------------------------------------
# Any HF VLM from a local dir
# ----------------------------------------------------------------------------------------


def _save_llava(path, vision: str = "swin", layout: str = "interleave") -> set[str]:
    torch.manual_seed(0)
    cfg = CaptionerConfig.preset("debug")
    cfg.vision, cfg.layout = vision, layout
    model, processor = build_captioner(cfg, ["A red circle moves up."])
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return set(processor.tokenizer.get_vocab())


def _bert_style_tokenizer(words):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]",
                                   eos_token="[SEP]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


WORDS = ["a", "red", "circle", "square", "moves", "left", "right", "up"]


def _save_blip(path) -> set[str]:
    """BLIP: a processor with no chat template, so it captions unconditionally."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    torch.manual_seed(0)
    tok = _bert_style_tokenizer(WORDS)
    vision = BlipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=32, pad_token_id=0, bos_token_id=2,
                          eos_token_id=3, sep_token_id=3)
    BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(path)
    return set(tok.get_vocab())


def _save_vit_gpt2(path) -> set[str]:
    """ViT + GPT2: AutoModelForImageTextToText maps it, but it has no processor class."""
    from transformers import (GPT2Config, ViTConfig, ViTImageProcessorPil, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    torch.manual_seed(0)
    tok = _bert_style_tokenizer(WORDS)
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2)
    dec = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    VisionEncoderDecoderModel(cfg).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    tok.save_pretrained(path)
    return set(tok.get_vocab())


def _save_llava_vit(path) -> set[str]:
    return _save_llava(path, vision="clip")


def _save_fast_vlm(path) -> set[str]:
    """Our conv-tower captioner (a ResNet in transformers' FastVLM), fed a non-square input."""
    return _save_llava(path, vision="resnet", layout="interleave+key")


@pytest.mark.parametrize("build,model_type", [(_save_llava, "llava"), (_save_llava_vit, "llava"),
                                              (_save_fast_vlm, "fast_vlm"), (_save_blip, "blip"),
                                              (_save_vit_gpt2, "vision-encoder-decoder")])
def test_random_vlm_from_dir_captions_a_batch(tmp_path, clips, build, model_type):
    vocab = build(tmp_path / "m")
    cap = Captioner.from_pretrained(str(tmp_path / "m"), max_new_tokens=6)
    assert cap.name == f"{model_type}:m" and cap.mode == "grid"  # no video processor: frame grids
    batch = [c for c, _ in clips[:3]] + [np.zeros((5, 40, 90, 3), np.uint8)]  # mixed sizes
    out = cap.caption(batch)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)
    # Every word decodes from the model's own vocabulary, and no prompt words leak in.
    assert all(w in vocab for t in out for w in t.split()), out
    assert not any("Describe" in t for t in out)
    # Greedy: the same clip gets the same caption alone or inside a batch.
    assert cap.caption(batch[1:2]) == out[1:2]


class _RecordingProcessor:
    """Stands in for a video-capable processor (those need torchvision, absent here)."""

    video_processor = object()
    chat_template = "x"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **kw):
        self.calls.append(("template", messages))
        return "PROMPT"

    def __call__(self, **kw):
        self.calls.append(("call", kw))
        return {"input_ids": torch.ones(len(kw["text"]), 3, dtype=torch.long)}


def test_video_capable_processor_gets_the_frames_as_video():
    model = torch.nn.Linear(1, 1)
    model.config = types.SimpleNamespace(is_encoder_decoder=False)
    proc = _RecordingProcessor()
    cap = Captioner(model, proc, name="stub", num_frames=3)
    assert cap.mode == "video"
    clip = np.arange(9, dtype=np.uint8)[:, None, None, None] * np.ones((9, 4, 6, 3), np.uint8)
    enc = cap.inputs([clip, clip[:5]])
    assert enc["input_ids"].shape == (2, 3)
    (_, messages), (_, kw) = proc.calls
    assert messages[0]["content"][0] == {"type": "video"}
    assert kw["text"] == ["PROMPT", "PROMPT"] and "images" not in kw
    assert [v[:, 0, 0, 0].tolist() for v in kw["videos"]] == [[0, 4, 8], [0, 2, 4]]


# ----------------------------------------------------------------------------------------
# Our captioner: train, save, load back through the generic path
# ----------------------------------------------------------------------------------------


def test_tokenizer_round_trips_captions(clips):
    tok = build_tokenizer([c for _, c in clips])
    for _, c in clips[:10]:
        ids = tok(c, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == c  # exact: punctuation stays attached to its word


def test_bag_of_words_loss_rewards_the_token_that_shows_each_word():
    """Targets are exactly the caption's words; the loss is the closed form of BCE, and an image
    whose tokens point at its words scores far lower than one pointing at other words."""
    caps = ["A large red circle rises.", "A small blue square falls."]
    model, processor = build_captioner(CaptionerConfig.preset("debug"), caps)
    tok = processor.tokenizer
    targets = bag_of_words_targets(processor, caps)  # (2, V)
    for i, c in enumerate(caps):
        assert set(tok.convert_ids_to_tokens(targets[i].nonzero()[:, 0].tolist())) == set(c.split())
    emb = torch.eye(len(tok))  # (V, V): word v's embedding is the unit vector e_v
    # One image token per word of the caption, 10 * e_w: that word's logit is 10, the rest 0.
    right = torch.stack([10 * emb[targets[i].bool()][:5] for i in range(2)])  # (2, 5, V)
    wrong = right.flip(0)
    got = bag_of_words_loss(right, emb, targets)
    expect = (5 * np.log1p(np.exp(-10.0)) + (len(tok) - 5) * np.log(2.0))  # BCE per image, summed over words
    assert abs(float(got) - expect) < 1e-4, (float(got), expect)
    # wrong: 4 of 5 words missed (ln 2 each, as if unseen) and 4 absent words claimed (~10 each)
    assert float(bag_of_words_loss(wrong, emb, targets)) > float(got) + 35


def test_tag_targets_parse_each_caption_into_attribute_slots():
    caps = ["A large red circle rises against a navy backdrop.", "A small blue square drifts to the left.",
            "Nothing this parser knows."]
    targets, classes = tag_targets(caps)  # slots: color, shape, size, motion, background
    assert classes == [2, 2, 2, 2, 1]  # the values seen, sorted: blue < red, circle < square, ...
    assert targets.tolist() == [[1, 0, 0, 1, 0], [0, 1, 1, 0, -100], [-100] * 5]
    # any parser with the slot keys works, e.g. one for another caption vocabulary
    t2, c2 = tag_targets(["x"], parse=lambda c: dict(color="red", shape=None, size=None, motion=None, background=None))
    assert t2.tolist() == [[0, -100, -100, -100, -100]] and c2 == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("pool", ["feature", "token"])
def test_tag_loss_is_the_cross_entropy_of_each_known_slot(pool):
    """Two slots, identity heads: the loss is the closed-form cross-entropy of the pooled
    logits, summed over the slots the batch knows; a slot unknown in the whole batch adds 0."""
    heads = torch.nn.ModuleList(torch.nn.Linear(3, 3, bias=False) for _ in range(2))
    for h in heads:
        torch.nn.init.eye_(h.weight)
    tokens = torch.zeros(2, 4, 3, requires_grad=True)
    with torch.no_grad():
        tokens[0, 1, 2] = 5.0  # image 0 shows class 2 in one token
        tokens[1, 3, 0] = 5.0  # image 1 shows class 0
    targets = torch.tensor([[2, -100], [0, -100]])  # slot 1 unknown everywhere
    got = tag_loss(tokens, heads, targets, pool)
    one = float(-torch.log_softmax(torch.tensor([0.0, 0.0, 5.0]), 0)[2])  # pooled logits (0, 0, 5)
    assert got.item() == pytest.approx(one, rel=1e-5)
    got.backward()
    assert tokens.grad[0, 1].abs().sum() > 0  # the gradient reaches the token that shows it
    wrong = tag_loss(tokens, heads, torch.tensor([[0, -100], [2, -100]]), pool)
    assert wrong.item() > got.item() + 4
    assert tag_loss(tokens, heads, torch.full((2, 2), -100), pool).item() == 0.0


def test_train_save_load_round_trip(tmp_path, clips):
    cfg = CaptionerConfig.preset("debug")
    cfg.max_steps = 60
    pixels, captions = encode_clips(iter(clips), cfg)  # a generator is fine: read once
    assert pixels.shape == (48, 3, *cfg.image_hw) and captions == [c for _, c in clips]
    assert -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    torch.manual_seed(0)
    model, processor = build_captioner(cfg, captions)
    stats = fit_captioner(model, processor, pixels, captions, cfg, max_minutes=10.0, seed=0)
    assert stats["steps"] == 60
    # The loss falls well below its start (about ln(vocab) ~ 4.5 at init).
    assert stats["final_loss"] < 0.6 * stats["first_loss"], stats
    assert cfg.tag_weight > 0 and stats["final_tag_loss"] < 0.8 * stats["first_tag_loss"], stats  # the tag heads learn
    frames = [c for c, _ in clips[:6]]
    mem = Captioner(model, processor, name="mem", max_new_tokens=40, grid_note=cfg.grid_note,
                    layout=cfg.layout, tile=cfg.tile)  # shown the frames the way it was trained
    in_memory = mem.caption(frames)
    save_captioner(model, processor, str(tmp_path / "cap"), cfg, stats)
    loaded = Captioner.from_pretrained(str(tmp_path / "cap"), max_new_tokens=40)
    assert loaded.name == f"{model.config.model_type}:cap" and loaded.num_frames == cfg.num_frames
    assert type(loaded.model) is type(model) and loaded.layout == cfg.layout and loaded.tile == cfg.tile
    assert loaded.grid_note is cfg.grid_note  # asked the way it was trained (captioner.json)
    inputs = loaded.inputs(frames)
    assert all(torch.equal(v, mem.inputs(frames)[k]) for k, v in inputs.items())  # same prompt, same grids
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, model(**inputs).logits)  # the same weights, bit for bit
    assert loaded.caption(frames) == in_memory
    assert all(t for t in in_memory), in_memory


def test_fit_captioner_mirrors_grid_and_caption_together(clips):
    """With flip_prob 1 every training example is the mirrored grid with the mirrored caption:
    what the model is fed pairs flip_grid(grid i) with caption i, "left" and "right" swapped."""
    cfg = CaptionerConfig.preset("debug")
    cfg.max_steps, cfg.flip_prob, cfg.bow_weight, cfg.tag_weight = 3, 1.0, 0.0, 0.0
    pixels, captions = encode_clips(iter(clips), cfg)
    torch.manual_seed(0)
    model, processor = build_captioner(cfg, captions)
    fed = []
    model.register_forward_pre_hook(lambda m, a, kw: fed.append((kw["pixel_values"], kw["labels"])), with_kwargs=True)
    fit_captioner(model, processor, pixels, captions, cfg, max_minutes=5.0)
    mirrored = flip_grid(pixels, cfg.num_frames, cfg.layout)
    perm = mirror_word_ids(processor.tokenizer)
    assert len(fed) == 3 and any("left" in c or "right" in c for c in captions)
    for px, lab in fed:
        for p, row in zip(px, lab):
            i = int(((mirrored - p).abs().flatten(1).amax(1) == 0).nonzero()[0, 0])  # which grid it is
            text = processor.tokenizer.decode(perm[row[row >= 0]].tolist(), skip_special_tokens=True)
            assert text == captions[i]  # un-mirroring the caption gives that grid's own caption
    cfg.tag_weight = 1.0  # the tags are not mirrored: refused rather than trained on wrong motion tags
    with pytest.raises(ValueError, match="flip_prob and tag_weight together are not supported"):
        fit_captioner(model, processor, pixels, captions, cfg, max_minutes=5.0)


def test_train_captioner_writes_a_model_dir(tmp_path, clips):
    cfg = CaptionerConfig.preset("debug")
    cfg.max_steps = 5
    stats = train_captioner(iter(clips[:16]), str(tmp_path / "c"), config=cfg, max_minutes=5.0)
    assert stats["steps"] == 5 and stats["examples"] == 16 and stats["preset"] == "custom"
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "captioner.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing pickled


def test_train_captioner_data_parallel_takes_the_same_steps(tmp_path, clips, ray_session):
    """2 Ray Train workers: each takes half of every global batch, DDP averages the gradients.
    The run follows the single-process one closely (not exactly: BatchNorm normalises each rank's
    half on its own, as in plain DDP) and saves the same kind of model dir."""
    from pipelines.train_captioner import train_captioner_on_ray

    cfg = CaptionerConfig.preset("debug")
    cfg.max_steps = 30
    one = train_captioner(iter(clips), str(tmp_path / "one"), config=cfg, max_minutes=5.0, seed=0)
    two = train_captioner_on_ray(iter(clips), str(tmp_path / "two"), config=cfg, max_minutes=5.0, seed=0, workers=2)
    assert two["threads"] == 1  # each worker trains on its 1 CPU
    assert one["workers"] == 1 and two["workers"] == 2 and one["steps"] == two["steps"] == 30
    # the same init and the same global batch: the first loss agrees to BatchNorm's half-batch noise
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-3)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=0.1)
    assert two["final_loss"] < 0.8 * two["first_loss"]
    cap = Captioner.from_pretrained(str(tmp_path / "two"), max_new_tokens=20)
    assert all(cap.caption([c for c, _ in clips[:3]]))
    assert not (tmp_path / "two" / "_train").exists()  # the run's storage is gone, the model dir is clean
    cfg.batch_size = 15
    with pytest.raises(ValueError, match="does not split over 2 workers"):
        train_captioner_on_ray(iter(clips[:16]), str(tmp_path / "odd"), config=cfg, max_minutes=1.0, workers=2)
