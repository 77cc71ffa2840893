"""The GPU check's dry run: every part of benchmarks/gpu_check.py at toy sizes on the CPU, so the
script cannot fail on a lent GPU for a reason a CPU would have shown."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex on the CPU warns that it is slow
def test_dry_run_measures_every_part_without_errors(tmp_path, restore_threads):
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert result["errors"] == [], json.dumps(result["errors"], indent=1)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["rows"] == result["rows"] and on_disk["device"].startswith("CPU")
    measured = [r for r in result["rows"] if r["value"] is not None]
    assert {r["part"] for r in measured} == set(gpu_check.PARTS)
    assert not [r for r in result["rows"] if "skipped" in r["details"]]

    figures = {r["figure"]: r for r in measured}
    runs = gpu_check.dry_sizes().train_runs
    train = [r for r in measured if r["part"] == "train"]
    assert len(train) == len(runs) and all(r["value"] > 0 for r in train)  # no MFU row without a known peak
    assert all(0 < r["details"]["tokens_per_pack"] <= budget for r, (_, _, budget, _) in zip(train, runs))
    # the Wan comparison ran both models on the same tokens, and the ratio is theirs
    wan = [r for r in measured if r["part"] == "wan" and r["unit"] == "tokens/s"]
    assert len(wan) == 2 and wan[0]["details"]["tokens"] == wan[1]["details"]["tokens"] > 0
    assert figures["ours / Wan: tokens/s"]["value"] == pytest.approx(wan[1]["value"] / wan[0]["value"], rel=1e-9)
    # every attention backend gives the result of SDPA per video
    attention = [r for r in measured if r["part"] == "attention"]
    assert len(attention) == 4
    assert all(r["details"]["max_abs_diff_vs_sdpa_per_video"] < 1e-4 for r in attention)
    assert {r["unit"] for r in measured if r["part"] in ("sampling", "vae")} == {"s", "ratio", "frames/s"}
    assert len([r for r in measured if r["part"] == "vae"]) == 4  # ours and Wan's, encode and decode

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | figure | value | unit | details |" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(result["rows"]) + 2  # + header, rule


def test_peak_flops_are_looked_up_by_device_name():
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert gpu_check.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16_flops("Some Future Card") is None
