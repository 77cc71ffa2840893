"""Our own small captioner: a tiny LLaVA built from stock Hugging Face classes, so it loads back
through the same `Captioner.from_pretrained` as any image-text-to-text model."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from sora.captioner.frames import LAYOUTS, grid_shape
from sora.captioner.inference import DEFAULT_PROMPT, GRID_NOTE
from sora.optim import LRSchedule

# A plain-text chat format: "user: <image> ... \nassistant: ". Word-level tokens, no BOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


@dataclass
class CaptionerConfig:
    """Size of our LLaVA captioner and of its training run; the defaults are the "tiny" preset
    (the shapes world on a CPU in minutes: `benchmarks/bench_captioner.py`)."""

    num_frames: int = 4  # frames sampled per clip into one image (a 2x2 grid for 4)
    image_size: int = 64  # the image is image_size^2 (twice as wide with the key frame), each frame image_size/2
    # how the frames make one image (`frame_grid`): "grid", "interleave" or "interleave+key"
    layout: str = "interleave+key"
    grid_note: bool = False  # prepend GRID_NOTE to the prompt (saved in captioner.json, so inference asks the same)
    # vision tower: "resnet" (FastVLM with a ResNet), "swin" or "clip" (a LLaVA with that tower)
    vision: str = "resnet"
    patch_size: int = 8  # swin, clip: the first patch (resnet ignores it); swin halves the grid per extra stage
    vision_dim: int = 32  # swin, resnet: first-stage width, doubled per stage; clip: the width
    vision_depths: tuple[int, ...] = (1, 1, 1)  # swin, resnet: blocks per stage; clip: sum() layers
    vision_heads: tuple[int, ...] = (3, 6)  # attention heads per stage (clip uses the first)
    # Swin attention window, in patches. FOOTGUN: HF Swin breaks (a shape error in attention)
    # when a later stage's grid is smaller than the window, so keep it <= the last grid side.
    window_size: int = 4
    absolute_positions: bool = True  # Swin: learned absolute position embeddings (where each image token is)
    text_dim: int = 128  # width of the Llama decoder
    text_layers: int = 2  # decoder layers
    text_heads: int = 4  # decoder attention heads
    batch_size: int = 32  # examples per step (the global batch, split over data-parallel workers)
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay (every parameter)
    warmup_steps: int = 50  # linear warmup steps
    max_steps: int = 4000  # the cosine schedule's length; the time budget may stop it earlier
    # weight of the bag-of-words loss (`bag_of_words_loss`, training only); 0 turns it off
    bow_weight: float = 0.0
    bow_pool: str = "token"  # bag of words: "token" (each word's best token) or "feature" (max-pooled tokens)
    # chance that a training example is mirrored left-right with its caption's left/right words swapped
    flip_prob: float = 0.0
    # weight of the attribute-tag loss (`tag_targets`, `tag_loss`; training only); 0 turns it off
    tag_weight: float = 1.0
    tag_pool: str = "feature"  # tag heads read the max-pooled image tokens ("feature") or each token ("token")

    def __post_init__(self) -> None:
        self.vision_depths, self.vision_heads = tuple(self.vision_depths), tuple(self.vision_heads)
        if self.vision not in ("swin", "clip", "resnet"):
            raise ValueError(f"vision must be 'swin', 'clip' or 'resnet', got {self.vision!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.bow_pool not in ("token", "feature") or self.tag_pool not in ("token", "feature"):
            raise ValueError(f"bow_pool and tag_pool must be 'token' or 'feature', got {self.bow_pool!r}, "
                             f"{self.tag_pool!r}")
        if self.flip_prob > 0 and self.tag_weight > 0:
            raise ValueError("flip_prob and tag_weight together are not supported: mirrored clips would keep their "
                             "unmirrored motion tags; set one of them to 0")
        H, W = self.image_hw
        if H % self.feature_stride or W % self.feature_stride:
            raise ValueError(f"the input {H}x{W} must be a multiple of the feature stride {self.feature_stride}: "
                             f"change image_size")
        if self.vision == "clip" and H != W:
            raise ValueError("the CLIP tower wants a square input: use layout 'grid' or 'interleave'")
        if self.vision == "swin" and len(self.vision_heads) != len(self.vision_depths):
            raise ValueError(f"one head count per Swin stage: vision_heads {self.vision_heads} for vision_depths "
                             f"{self.vision_depths}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.max_steps >= 1):
            raise ValueError(f"need lr > 0, batch_size >= 1, max_steps >= 1, got {self.lr}, {self.batch_size}, "
                             f"{self.max_steps}")

    @property
    def tile(self) -> tuple[int, int]:
        """Each frame's size inside the image_size^2 input (so the processor never resizes)."""
        rows, cols = grid_shape(self.num_frames)
        return self.image_size // rows, self.image_size // cols

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input: image_size^2, twice as wide with the key frame."""
        return self.image_size, self.image_size * (2 if self.layout == "interleave+key" else 1)

    @property
    def feature_stride(self) -> int:
        """Pixels per image token handed to the language model."""
        if self.vision == "swin":
            return self.patch_size * 2 ** (len(self.vision_depths) - 1)
        if self.vision == "resnet":  # stem: conv stride 2 + max-pool stride 2; then stride 2 per later stage
            return 4 * 2 ** (len(self.vision_depths) - 1)
        return self.patch_size

    @property
    def image_tokens(self) -> int:
        """Image tokens per clip: the (H / feature_stride) x (W / feature_stride) grid (+1 CLS for clip)."""
        H, W = self.image_hw
        return (H // self.feature_stride) * (W // self.feature_stride) + (self.vision == "clip")

    def lr_schedule(self) -> LRSchedule:
        """Warmup, then a cosine to 5% of lr over max_steps (or the time budget, if it ends first)."""
        return LRSchedule(lr=self.lr, warmup_steps=self.warmup_steps, decay="cosine", min_lr_ratio=0.05,
                          max_steps=self.max_steps)

    @staticmethod
    def preset(name: str) -> "CaptionerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown captioner preset {name!r}: use one of {sorted(PRESETS)}")
        return replace(PRESETS[name])


PRESETS: dict[str, CaptionerConfig] = {
    # Unit tests: trains in seconds, learns only the caption template.
    "debug": CaptionerConfig(image_size=32, patch_size=4, vision_dim=16, vision_depths=(1, 1), vision_heads=(2, 2),
                             window_size=4, text_dim=64, text_layers=1, text_heads=2, batch_size=16, lr=3e-3,
                             warmup_steps=5, max_steps=200),
    # The shapes world on a CPU in minutes (benchmarks/bench_captioner.py, `sora demo`).
    "tiny": CaptionerConfig(),
    # A start for natural video: a 224 px grid of 8 frames (3x3), a Swin-T-sized tower.
    "base": CaptionerConfig(num_frames=8, image_size=224, layout="interleave", vision="swin", patch_size=4,
                            vision_dim=96, vision_depths=(2, 2, 6, 2),
                            vision_heads=(3, 6, 12, 24), window_size=7, text_dim=512, text_layers=6, text_heads=8,
                            batch_size=64, lr=3e-4, warmup_steps=500, max_steps=50000,
                            bow_weight=1.0, tag_weight=0.0),  # natural captions: no shapes-world tags
}


_LEFT_RIGHT = re.compile(r"^(left|right)(wards?)?([.,;:!?]*)$")


def _mirror_word(word: str) -> str:
    """"left" <-> "right", "leftward." <-> "rightward." (lower case, punctuation kept); any
    other word is its own mirror."""
    m = _LEFT_RIGHT.match(word)
    if m is None:
        return word
    return ("right" if m.group(1) == "left" else "left") + (m.group(2) or "") + m.group(3)


def build_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer whose vocabulary is every whitespace-separated word of `texts`
    (punctuation stays attached: "background." is one token, so decoding is an exact inverse of
    single-spaced text) plus the special tokens, plus the left/right mirror of every direction
    word (see `mirror_word_ids`). Returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.WhitespaceSplit()
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    words = sorted((words | {_mirror_word(w) for w in words}) - set(SPECIALS))  # a mirrored caption stays in vocabulary
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # join with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=CHAT_TEMPLATE)


def make_image_processor(cfg: CaptionerConfig):
    """The PIL (torchvision-free) CLIP image processor: grid -> (3, H, W) = cfg.image_hw, in [-1, 1]."""
    from transformers import CLIPImageProcessorPil

    H, W = cfg.image_hw
    size = {"height": H, "width": W}
    # Stretch to a square, no crop: a centre crop would cut off the first and last frames.
    return CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_captioner(cfg: CaptionerConfig, texts: Iterable[str]):
    """A randomly initialised captioner and its processor; the tokenizer's vocabulary comes from
    `texts` (the training captions; the prompt words are added here).

    vision "swin" / "clip": a LLaVA (`LlavaForConditionalGeneration`), whose tower must return
    (B, N, D) hidden states. vision "resnet": the same LLaVA design with a convolutional tower,
    which transformers ships as FastVLM (`FastVlmForConditionalGeneration`, Vasu et al. 2025:
    a LLaVA whose projector reads the tower's last (B, C, h, w) feature map as h * w tokens); any
    stock HF CNN fits there, here `ResNetModel`. Both load through `AutoModelForImageTextToText`
    and use a `LlavaProcessor`.
    Returns (model, LlavaProcessor)."""
    from transformers import (CLIPVisionConfig, FastVlmConfig, FastVlmForConditionalGeneration, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, ResNetConfig, SwinConfig)

    H, W = cfg.image_hw
    fixed = [GRID_NOTE.format(k=cfg.num_frames), DEFAULT_PROMPT, "user: assistant:"]  # the chat words
    tok = build_tokenizer(list(texts) + fixed)
    # The processor expands <image> into (H / patch_size) * (W / patch_size) + extra placeholders;
    # for Swin and ResNet its "patch" is the stride of the LAST stage, and there is no CLS token.
    processor = LlavaProcessor(image_processor=make_image_processor(cfg), tokenizer=tok,
                               patch_size=cfg.feature_stride, vision_feature_select_strategy="full",
                               num_additional_image_tokens=int(cfg.vision == "clip"), image_token="<image>",
                               chat_template=CHAT_TEMPLATE)
    widths = [cfg.vision_dim * 2 ** i for i in range(len(cfg.vision_depths))]
    if cfg.vision == "swin":
        # hidden_states[-1] of SwinModel is the last stage, (B, N, vision_dim * 2^(stages-1)):
        # LLaVA's projector reads config.hidden_size, which Swin sets to exactly that width.
        vision = SwinConfig(image_size=[H, W], patch_size=cfg.patch_size, embed_dim=cfg.vision_dim,
                            depths=list(cfg.vision_depths), num_heads=list(cfg.vision_heads),
                            window_size=cfg.window_size, mlp_ratio=4.0,
                            use_absolute_embeddings=cfg.absolute_positions)
    elif cfg.vision == "resnet":
        # Basic blocks (two 3x3 convs), widths doubling per stage. FastVLM's projector reads
        # vision_config.hidden_size, which ResNetConfig lacks: set it to the last stage's width
        # (an extra config attribute, saved in config.json like any other).
        vision = ResNetConfig(embedding_size=cfg.vision_dim, hidden_sizes=widths, depths=list(cfg.vision_depths),
                              layer_type="basic", downsample_in_first_stage=False, hidden_size=widths[-1])
    else:
        vision = CLIPVisionConfig(image_size=H, patch_size=cfg.patch_size, hidden_size=cfg.vision_dim,
                                  intermediate_size=4 * cfg.vision_dim, num_hidden_layers=sum(cfg.vision_depths),
                                  num_attention_heads=cfg.vision_heads[0])
    ids = {k: tok.convert_tokens_to_ids(k) for k in SPECIALS}
    text = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.text_dim, intermediate_size=4 * cfg.text_dim,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_heads, max_position_embeddings=512,
                       pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                       tie_word_embeddings=True)
    if cfg.vision == "resnet":
        config = FastVlmConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                               image_seq_length=cfg.image_tokens, projector_hidden_act="gelu")
        model = FastVlmForConditionalGeneration(config)
    else:
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
    assert config.vision_config.hidden_size == model.model.multi_modal_projector.linear_1.in_features
    g = model.generation_config
    g.eos_token_id, g.pad_token_id, g.bos_token_id = ids["</s>"], ids["<pad>"], ids["<s>"]
    g.do_sample, g.max_new_tokens = False, 64
    return model, processor


def mirror_word_ids(tokenizer) -> torch.Tensor:
    """(V,) long permutation of the vocabulary that a left-right mirror applies to a caption:
    "left" <-> "right", "leftward." <-> "rightward." etc. (lower case, punctuation kept); every
    other word maps to itself. An involution. `build_tokenizer` puts every mirror word in the
    vocabulary; with another tokenizer a word whose mirror is missing would stay unswapped."""
    vocab = tokenizer.get_vocab()
    perm = torch.arange(len(tokenizer))
    for word, i in vocab.items():
        perm[i] = vocab.get(_mirror_word(word), i)
    assert torch.equal(perm[perm], torch.arange(len(perm))), "the left/right swap must be an involution"
    return perm
