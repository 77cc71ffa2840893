"""The recaptioner: descriptive captions for clips from any Hugging Face vision-language model.

Sora (and DALL-E 3 before it, Betker et al. 2023) trains on *descriptive* captions written by a
captioner model rather than on whatever short text came with the data. Two halves live here:

1. `Captioner` - inference. `Captioner.from_pretrained(dir)` loads ANY image-text-to-text model
   from a local directory through `AutoModelForImageTextToText` + `AutoProcessor` (offline),
   asks it for a caption through the processor's chat template, and decodes greedily. Processors
   with a video processor get the sampled frames as a video; image-only ones get a *frame grid*
   (k frames tiled into one image, time order left to right then top to bottom) so that motion
   is visible in a single picture. Processors with no chat template (BLIP, ViT+GPT2) caption the
   image unconditionally, as they were trained to.

2. Our own small captioner, built from stock Hugging Face classes so it loads back through the
   very same `Captioner.from_pretrained`: a LLaVA design (a vision tower, a 2-layer projector, a
   Llama decoder) sized in kilobytes-to-megabytes, with a word-level tokenizer trained on the
   caption vocabulary and a `CLIPImageProcessorPil` (no torchvision on the target machines). The
   default tower is a small ResNet, which transformers runs as FastVLM
   (`FastVlmForConditionalGeneration`: LLaVA with a convolutional tower); Swin or CLIP towers
   make a plain `LlavaForConditionalGeneration` (see `CaptionerConfig.vision`).
   `train_captioner` is a plain torch loop on (clip, caption) pairs that saves a normal HF model dir;
   `pipelines.train_captioner` runs the same loop data-parallel on Ray Train workers.

The parts: `frames` (frame grids), `inference` (`Captioner`, any HF model), `model` (our
LLaVA: config, tokenizer, builder), `losses` (bag of words, attribute tags), `training`
(inputs, the loss module, the loop, saving).

Why LLaVA: of the classes `AutoModelForImageTextToText` maps in transformers 5, it is the
simplest one whose processor has a chat template and a PIL image processor, so our model goes
through exactly the code path a real VLM (SmolVLM, Qwen2-VL, LLaVA-1.5) does. BLIP loads too (no
chat template); `vision-encoder-decoder` (ViT + GPT2) has a model mapping but no processor class,
so `_load_processor` pairs its image processor and tokenizer by hand.

Tiny CPU run (seconds; see `benchmarks/bench_captioner.py` for the 8-minute run):

    from sora import shapes
    specs = [shapes.sample_clip(0, i, ranges=shapes.TINY) for i in range(64)]
    train_captioner(((shapes.render(s), s.caption()) for s in specs), "cap", preset="debug",
                    max_minutes=0.5)
    Captioner.from_pretrained("cap").caption([shapes.render(specs[0])])   # -> ["A large ..."]
"""

from __future__ import annotations

from sora.captioner.frames import LAYOUTS, flip_grid, frame_grid, grid_shape, sample_frame_indices
from sora.captioner.inference import DEFAULT_PROMPT, GRID_NOTE, SIDECAR, Captioner, prompt_text
from sora.captioner.losses import TAG_SLOTS, bag_of_words_loss, bag_of_words_targets, tag_loss, tag_targets
from sora.captioner.model import (CHAT_TEMPLATE, PRESETS, SPECIALS, CaptionerConfig, build_captioner, build_tokenizer,
                                  make_image_processor, mirror_word_ids)
from sora.captioner.training import (CaptionObjective, encode_clips, fit_captioner, save_captioner,
                                     train_captioner)

__all__ = ["CHAT_TEMPLATE", "DEFAULT_PROMPT", "GRID_NOTE", "LAYOUTS", "PRESETS", "SIDECAR", "SPECIALS", "TAG_SLOTS",
           "CaptionObjective", "Captioner", "CaptionerConfig", "bag_of_words_loss", "bag_of_words_targets",
           "build_captioner", "build_tokenizer", "encode_clips", "fit_captioner", "flip_grid", "frame_grid",
           "grid_shape", "make_image_processor", "mirror_word_ids", "prompt_text", "sample_frame_indices",
           "save_captioner", "tag_loss", "tag_targets", "train_captioner"]
