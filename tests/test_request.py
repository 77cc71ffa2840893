"""One generation request: validation against limits (each caller naming fields its own way),
defaults from a model index, batching keys, a JSON round trip, and the same rule in every entry
point (bulk rows, the HTTP API, the Python call)."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest

from sora.request import (BULK_LIMITS, DEFAULT_STRENGTH, NO_LIMITS, GenerationRequest, Limits, RequestError,
                          resolve_mode)

DEFAULTS = {"width": 64, "height": 48, "fps": 8.0, "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 3.0}


def error(request: GenerationRequest, limits: Limits = NO_LIMITS, names=None) -> RequestError:
    with pytest.raises(RequestError) as e:
        request.validate(limits, names)
    return e.value


def test_modes_are_resolved_from_inputs_and_aliases_and_checked_against_them():
    assert resolve_mode(None, False, False) == "text-to-video"
    assert resolve_mode(None, True, False) == "image-to-video"
    assert resolve_mode(None, False, True) == "extend-forward"
    assert resolve_mode("i2v", True, False) == "image-to-video" and resolve_mode("interpolate", False, True) == "join"
    assert GenerationRequest("x", video=["a.mp4", "b.mp4"], mode="join").validate().video == ("a.mp4", "b.mp4")
    assert "unknown mode 'teleport'" in str(error(GenerationRequest("x", mode="teleport")))
    e = error(GenerationRequest("x", mode="edit"), names={"mode": "--mode", "video": "--video"})
    assert (str(e), e.field) == ("--mode 'edit' needs --video", "video")
    assert error(GenerationRequest("x", mode="join", video="a.mp4")).field == "video"  # a pair, not one video
    assert "does not apply" in str(error(GenerationRequest("x", image="a.png", video="b.mp4", mode="edit")))
    assert "does not apply" in str(error(GenerationRequest("x", video="b.mp4", mode="draft")))


@pytest.mark.parametrize("change,field,words", [
    ({"prompt": "  "}, "prompt", "must not be empty"),
    ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ({"prompt": 3}, "prompt", "must be a string"),
    ({"width": 64}, "size", "give both"),
    ({"width": 33, "height": 32}, "size", "even width and height"),
    ({"width": 5000, "height": 32}, "size", "between 1 and 4096"),
    ({"num_frames": 0}, "num_frames", "frames must be between 1 and 1024, got 0"),
    ({"num_frames": 2.5}, "num_frames", "whole number"),
    ({"num_frames": 9, "seconds": 1.0}, "num_frames", "not both"),
    ({"seconds": 0}, "seconds", "seconds must be in (0, 600], got 0"),
    ({"fps": float("nan")}, "fps", "finite"),
    ({"steps": 1001}, "steps", "steps must be between 1 and 1000"),
    ({"guidance_scale": -1.0}, "guidance_scale", "at least 0"),
    ({"sampler": "ddim"}, "sampler", "sampler must be one of"),
    ({"seed": -1}, "seed", "non-negative 64-bit"),
    ({"seed": 2 ** 63}, "seed", "non-negative 64-bit"),
    ({"strength": 0.5}, "strength", "applies to modes 'edit' and 'draft'"),
    ({"strength": 1.5, "mode": "draft"}, "strength", "between 0 and 1"),
    ({"context_frames": 0}, "context_frames", "at least 1"),
    ({"draft_scale": 0.0}, "draft_scale", "in (0, 1]"),
])
def test_each_rule_names_its_field(change, field, words):
    e = error(replace(GenerationRequest("a red circle"), **change), BULK_LIMITS, names={"num_frames": "frames"})
    assert e.field == field and words in str(e), str(e)


def test_limits_bound_what_a_request_may_ask_and_the_defaults_suit_an_endpoint():
    big = GenerationRequest("x", width=1920, height=1088, steps=500, guidance_scale=30.0)
    assert big.validate(NO_LIMITS).steps == 500 and big.validate(BULK_LIMITS).width == 1920
    assert "more than the limit of 921600" in str(error(big, Limits()))
    assert error(replace(big, width=64, height=64), Limits()).field == "steps"
    assert error(GenerationRequest("x", width=8, height=8), Limits()).field == "size"  # below the VAE stride
    assert GenerationRequest("", width=9, height=7).validate(NO_LIMITS).width == 9  # the unconditional branch, any size
    assert error(GenerationRequest("x" * 4001), Limits()).field == "prompt"
    with pytest.raises(ValueError, match="max_side"):
        Limits(max_side=0)


def test_numbers_are_normalised_and_defaults_come_from_the_model_index():
    import numpy as np

    req = GenerationRequest("x", width=np.int64(40), height=30.0, seconds=1.5, mode="t2v").validate()
    assert (type(req.width), req.height, req.mode) == (int, 30, "text-to-video")
    full = req.resolve(DEFAULTS)
    assert (full.width, full.height, full.num_frames, full.seconds, full.fps) == (40, 30, 12, None, 8.0)
    assert (full.steps, full.guidance_scale, full.sampler, full.strength) == (4, 3.0, "euler", None)
    edit = GenerationRequest("x", video="v.mp4", mode="edit").validate().resolve(DEFAULTS, video_frames=13)
    assert (edit.num_frames, edit.strength) == (13, DEFAULT_STRENGTH["edit"])  # an edit keeps its video's length
    draft = GenerationRequest("x", mode="draft").validate().resolve({**DEFAULTS, "sampler": "heun"})
    assert (draft.strength, draft.sampler, draft.num_frames) == (DEFAULT_STRENGTH["draft"], "heun", 9)


def test_shape_keys_batch_what_one_packed_call_can_run_and_requests_round_trip_json():
    t2v = GenerationRequest("a", width=32, height=32, seed=1)
    i2v = GenerationRequest("b", width=32, height=32, seed=2, image="first.png", negative_prompt="blur")
    assert t2v.shape_key() == i2v.shape_key()  # text- and image-to-video share a layout
    assert t2v.shape_key() != replace(t2v, steps=3).shape_key()
    e1 = GenerationRequest("a", mode="edit", video="one.mp4")
    assert e1.shape_key() == replace(e1, prompt="c").shape_key() != replace(e1, video="two.mp4").shape_key()
    join = GenerationRequest("j", video=("a.mp4", "b.mp4"), mode="join", strength=None, seed=7)
    for r in (t2v, i2v, e1, join):
        again = GenerationRequest.from_dict(json.loads(json.dumps(r.to_dict())))
        assert again == r and again.shape_key() == r.shape_key()
    json.dumps(join.shape_key())  # grouping keys are JSON (bulk groups by them)
    with pytest.raises(ValueError, match="unknown GenerationRequest fields"):
        GenerationRequest.from_dict({"prompt": "x", "num_inference_steps": 3})


def test_one_rule_in_every_entry_point():
    """The same bad value is refused by a bulk row, the HTTP API and the Python call, each in its words."""
    from pipelines.generate_bulk import BulkConfig, parse_request
    from pipelines.video_requests import APIError, ModelInfo, parse_create

    with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 5000"):
        parse_request(0, {"prompt": "x", "steps": 5000}, BulkConfig())
    with pytest.raises(ValueError, match="frames must be at least 1|frames must be between 1 and 1024"):
        BulkConfig(frames=0)
    model = ModelInfo(name="m", width=32, height=32, fps=8, num_frames=9, steps=2, guidance_scale=2.0)
    with pytest.raises(APIError) as e:
        parse_create({"prompt": "x", "num_inference_steps": 5000}, {}, Limits(), model)
    assert e.value.param == "num_inference_steps" and "num_inference_steps must be between 1 and 100" in e.value.message
    with pytest.raises(APIError) as e:
        parse_create({"prompt": "x", "seed": -3}, {}, Limits(), model)
    assert e.value.param == "seed" and e.value.status == 400


def test_to_dict_keeps_a_subclass_fields():
    """A bulk row is a GenerationRequest with an id of its own: to_dict must carry it."""
    from dataclasses import dataclass

    @dataclass
    class Row(GenerationRequest):
        id: str = ""

    d = Row(prompt="a red circle", id="p7").to_dict()
    assert d["id"] == "p7" and d["prompt"] == "a red circle"
    assert GenerationRequest(prompt="x").to_dict().keys() == {f.name for f in fields(GenerationRequest)}
