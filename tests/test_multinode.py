"""Several Ray nodes (`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own
raylet and object store), the data on a loopback S3 server: ingest, encode and bulk generation
do work on every node, and each, losing a worker node while that node writes one of its output
files, ends with exactly the rows of a clean run; an ingest stopped right after losing a node is
finished by a re-run that does only the missing sources. DiT training with one worker per node
loses a worker node while it uploads a checkpoint, and the group Ray Train restarts on the nodes
left resumes from the last registered checkpoint and trains to the last step. The scenarios run
in a subprocess (tests/multinode_scenarios.py: a process connects to one Ray, and this session
has its own), once for both tests; they assert on the facts it writes.

Marked `multinode` (part of the default run; the README's command starts this file first, it
is the longest): `pytest -m multinode` runs them alone, about 3 minutes on 2 cores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    """Both parts on one cluster (one start, one set of inputs; training reads the clean run's latents)."""
    return run_scenarios(tmp_path_factory.mktemp("multinode"), "stages,training")


def run_scenarios(tmp_path, parts: str) -> dict:
    """tests/multinode_scenarios.py PARTS in a subprocess; the facts it wrote."""
    result = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multinode_scenarios.py"), str(tmp_path / "work"),
                           str(result), parts], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    r = json.loads(result.read_text())
    assert "error" not in r and proc.returncode == 0, (r.get("error"), r.get("cluster_at_error"), proc.stdout[-3000:])
    return r


def test_stages_on_three_nodes_survive_a_lost_node_with_exactly_the_clean_rows(facts):
    r = facts

    ingest, encode, bulk = r["ingest"], r["encode"], r["bulk"]
    clean_nodes = set(ingest["clean"]["nodes"])
    assert len(clean_nodes) == 3
    # every stage works on every node (sources finished, encode batches, bulk units per Ray node)
    worked = {"ingest": set(ingest["clean"]["node_of_source"].values()),
              "encode": set(encode["clean"]["summary"]["batches_per_node"]),
              "bulk": set(bulk["clean"]["summary"]["units_per_node"])}
    assert all(w == clean_nodes for w in worked.values()), worked
    for stage in (ingest, encode, bulk):  # the node killed was one of the cluster's, writing an output file
        assert stage["faulted"]["lost"]["node"] in stage["faulted"]["nodes_before"]
    # a node lost mid-write: exactly the clean rows, the same visible files
    assert ingest["clean"]["clips"] and ingest["faulted"]["clips"] == ingest["clean"]["clips"]
    assert ingest["faulted"]["quarantine"] == ingest["clean"]["quarantine"]
    assert ingest["faulted"]["files"]["visible"] == ingest["clean"]["files"]["visible"]
    assert encode["clean"]["rows"] and encode["faulted"]["rows"] == encode["clean"]["rows"]
    assert encode["faulted"]["ray_data_rows"] == len(encode["clean"]["rows"])  # what training reads: no partial file
    assert encode["faulted"]["files"]["visible"] == encode["clean"]["files"]["visible"]
    manifest = lambda rows: [{k: v for k, v in m.items() if k != "unit"} for m in rows]  # noqa: E731
    assert manifest(bulk["faulted"]["manifest"]) == manifest(bulk["clean"]["manifest"])
    assert all(m["status"] == "ok" and m["video_sha1"] for m in bulk["faulted"]["manifest"])
    assert bulk["rerun"]["generated"] == 0 and bulk["rerun"]["already_done"] == len(bulk["clean"]["manifest"])

    # stopped after losing a node, then run again: only the missing sources, the same rows
    stopped = ingest["stopped"]
    sources = len(ingest["clean"]["node_of_source"])
    assert stopped["stopped"]
    assert stopped["rerun"]["sources_processed"] >= 1 and stopped["rerun"]["sources_skipped_already_done"] >= 1
    assert stopped["rerun"]["sources_processed"] + stopped["rerun"]["sources_skipped_already_done"] == sources
    assert stopped["clips"] == ingest["clean"]["clips"] and stopped["quarantine"] == ingest["clean"]["quarantine"]


def test_training_on_three_nodes_resumes_from_its_last_checkpoint_on_the_nodes_left(facts):
    r = facts
    train = r["train"]
    nodes = set(train["nodes_before"])
    assert len(nodes) == 3 and set(train["first_workers"].values()) == nodes  # one worker per node ("spread")
    lost = train["lost"]
    assert lost["node"] in nodes and lost["node"] != r["head"]  # a worker node, while it uploaded a checkpoint
    assert lost["sender_gone"] and not lost["stored"]
    left = nodes - {lost["node"]}
    assert set(train["nodes_after"]) == left
    assert len(train["second_workers"]) == 3 and set(train["second_workers"].values()) <= left
    # the checkpoint being written when the node went was never registered: the restarted group
    # resumed from the one before, and the run went on from its step to the last
    step = train["committed_before_loss"]
    assert step >= train["every"] and train["committed_at_loss"] == step
    summary = train["summary"]
    assert summary["resumed_from"] == [step] and summary["steps"] == train["max_steps"]
    assert [s for s, _ in train["losses"]] == list(range(1, train["max_steps"] + 1))
    assert all(math.isfinite(loss) for _, loss in train["losses"])
