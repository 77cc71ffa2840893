"""Text encoders: the offline MiniLM, a tiny T5 encoder and a tiny CLIP text tower, one interface."""

from __future__ import annotations

import os

import pytest
import torch

from sora.text_encoder import TextEncoder, build_tiny_t5_encoder, pooled

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTIONS = ["red circle", "A large red circle moves from left to right across a black background."]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_pretrained(None, max_length=32)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> TextEncoder:
    path = build_tiny_t5_encoder(tmp_path_factory.mktemp("t5"))
    return TextEncoder.from_pretrained(path, max_length=48)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> TextEncoder:
    """A random tiny CLIPTextModel with a BPE tokenizer trained on the fly (no invented vocab file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok.train_from_iterator(CAPTIONS * 4 + ["a small blue square moves up", "green triangle"], trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    cfg = CLIPTextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=bos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(str(path))
    return TextEncoder.from_pretrained(path, max_length=64)


def _check_padding_invariance(enc: TextEncoder):
    """Real-token states of a short caption do not change when a longer caption pads it."""
    alone, mask_alone = enc.encode(CAPTIONS[:1])
    batch, mask = enc.encode(CAPTIONS)
    n = int(mask_alone.sum())
    assert int(mask[0].sum()) == n and batch.shape[1] > n
    assert torch.allclose(batch[0, :n], alone[0, :n], atol=1e-5)
    assert (batch[0, n:] == 0).all()  # padded positions are zeroed


def _check_mask_matches_token_lengths(enc: TextEncoder):
    states, mask = enc.encode(CAPTIONS)
    lengths = [len(enc.tokenizer(t, truncation=True, max_length=enc.max_length)["input_ids"]) for t in CAPTIONS]
    assert mask.dtype == torch.bool and mask.sum(dim=1).tolist() == lengths
    assert states.shape == (2, max(lengths), enc.dim) and states.dtype == torch.float32
    assert mask[:, 0].all() and not mask[0, lengths[0]:].any()  # right padding


def test_minilm_default_encoder(minilm):
    assert minilm.dim == 384 and "minilm" in minilm.name_or_path.lower()
    _check_mask_matches_token_lengths(minilm)
    _check_padding_invariance(minilm)
    fixed, mask = minilm.encode(CAPTIONS, fixed_length=True)
    assert fixed.shape == (2, 32, 384) and mask.shape == (2, 32)
    # a real sentence embedding: a paraphrase is closer than an unrelated sentence
    s, m = minilm.encode(["A red circle moves to the left.", "A red ball moving leftwards.", "Stock markets fell sharply today."])
    e = torch.nn.functional.normalize(pooled(s, m), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_tiny_t5_encoder_loads_encoder_only(tiny_t5):
    from transformers import T5EncoderModel

    assert type(tiny_t5.model) is T5EncoderModel  # not a full encoder-decoder T5Model
    assert tiny_t5.dim == 32
    _check_mask_matches_token_lengths(tiny_t5)
    _check_padding_invariance(tiny_t5)
    _, mask = tiny_t5.encode(["x" * 200])
    assert mask.shape == (1, 48)  # truncated to max_length


def test_tiny_clip_text_encoder(tiny_clip):
    from transformers import CLIPTextModel

    assert type(tiny_clip.model) is CLIPTextModel and tiny_clip.dim == 32
    _check_mask_matches_token_lengths(tiny_clip)
    _check_padding_invariance(tiny_clip)


def test_pooled_is_the_mean_of_real_tokens():
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(pooled(states, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


def test_missing_local_path_is_an_error_not_a_download(tmp_path):
    with pytest.raises(AssertionError, match="not a local directory"):
        TextEncoder.from_pretrained(tmp_path / "no-such-model")
