"""Data-parallel training (lightclip.distributed): 2 ranks x batch B/2 train exactly as 1 process x batch B.

The ranks are real processes started by ``torchrun`` (gloo on CPU, rendezvous on 127.0.0.1);
the single-process reference runs the same worker function in this process. Compared: every
step's loss terms, the validation/test metrics and every saved weight. Also: two torchrun agents
as two "machines" (``--nnodes 2``) running ``lightclip pretrain`` to completion, a run killed
on 2 ranks and resumed on 1, and the sampler and gather helpers on one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import distributed_worker as worker
from lightclip.cli import main as cli_main
from lightclip.config import SplitConfig, SynthConfig, concrete_edges
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.distributed import DistributedError, World, free_port, gather_pair, launched_by_torchrun, local_size, shard, threads_per_rank, torchrun_command
from lightclip.kg.build import build_knowledge_graph
from lightclip.models.zoo import arch_config, build_from_config, save_model
from lightclip.teacher_cache import embed_with_teacher
from lightclip.training import checkpoint_key

WORKER = Path(worker.__file__)
TIMEOUT_S = 240  # a hung collective fails the test instead of the suite
#: Float tolerance: the same sums in another order (two half-batch GEMMs, a gathered reduction).
#: Measured on these runs: 2 ranks differ from 1 process by at most 5e-7 in a weight and 2e-6 in a
#: loss; a gather without gradients (open_clip's gather_with_grad=False) or gradients summed
#: instead of averaged over the ranks move some weight by 1.5e-3 or more and a loss by 0.03 or more.
RTOL, ATOL = 1e-4, 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A split synthetic catalogue at 32 px (48 train / 8 val / 8 test), its knowledge graph,
    a 48-d tiny teacher (the 32-d student needs projections) and its cached embeddings."""
    root = tmp_path_factory.mktemp("ddp")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=7, n_items=64, image_size=32), progress=False)
    catalogue = assign_splits(raw, SplitConfig(seed=0, val=8, test=8)).save(root / "split")
    build_knowledge_graph(catalogue, worker.KG, root / "kg", stats_path=root / "kg.json", figure_path=root / "kg.png", progress=False)
    wide = deepcopy(arch_config("lc-test-tiny"))
    wide["embed_dim"] = 48
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_model(build_from_config(wide), "lc-test-tiny", root / "teacher")
    embed_with_teacher(root / "teacher", catalogue, "train", root / "cache").save(root / "teacher_emb" / "train.safetensors")
    return root


def loopback_env() -> dict[str, str]:
    """The ranks' environment: gloo on the loopback interface, one thread, no telemetry."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", DO_NOT_TRACK="1", PYTHONPATH=str(WORKER.parent))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_ranks(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=loopback_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def torchrun_worker(stage: str, workspace: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
        str(WORKER), stage, str(workspace), str(out), *extra,
    ]
    return run_ranks(command, out.parent)


def assert_same_run(one: Path, two: Path, metrics_one: dict) -> None:
    """Same loss terms at every step, same metrics, same weights (within float tolerance)."""
    steps_one, steps_two = (json.loads((d / "steps.json").read_text()) for d in (one, two))
    assert [s["step"] for s in steps_one] == [s["step"] for s in steps_two]
    for a, b in zip(steps_one, steps_two):
        terms = sorted(k for k in a if k.startswith("train/") and k != "train/pairs_per_s")
        assert terms == sorted(k for k in b if k.startswith("train/") and k != "train/pairs_per_s")
        np.testing.assert_allclose([b[k] for k in terms], [a[k] for k in terms], rtol=RTOL, atol=ATOL, err_msg=f"step {a['step']}: {terms}")
    metrics_two = json.loads((two / "model.json").read_text())
    recall = sorted(k for k in metrics_one if k.startswith(("val/", "test/")))
    assert recall and {k: metrics_two[k] for k in recall} == pytest.approx({k: metrics_one[k] for k in recall}, abs=1e-6)
    assert metrics_two["steps"] == metrics_one["steps"]
    weights_one, weights_two = (load_file(d / "model" / "model.safetensors") for d in (one, two))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("stage", ["pretrain", "distill"])
def test_two_ranks_train_as_one_process_with_the_global_batch(stage: str, workspace: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    metrics = worker.run(stage, workspace, one)
    if stage == "pretrain":
        assert metrics["prototype_refreshes"] == 2  # the concept term ran, prototypes were re-picked
    started = time.perf_counter()
    result = torchrun_worker(stage, workspace, two)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_run(one, two, metrics)
    steps = json.loads((two / "steps.json").read_text())
    terms = set(steps[0])
    if stage == "pretrain":
        assert {"train/concept", "train/concept_prototype", "train/concept_image"} <= terms
        assert any(s["train/concept_prototype"] > 0 for s in steps)  # the memory bank fed prototypes
    else:
        graph = {f"train/{edge}/{entry.loss}" for edge, entry in concrete_edges(worker.distill_config().edges)}
        assert len(graph) >= 4 and graph <= terms  # every edge of the graph was trained
    assert sorted(p.name for p in (two / ".cache" / "checkpoints").rglob("*.pt")) == ["best.pt", "last.pt"]  # rank 0 alone wrote
    print(f"{stage}: 2 ranks in {time.perf_counter() - started:.1f} s")


def test_rows_every_rank_holds_are_encoded_in_shares_with_the_gradient_of_one_process(tmp_path: Path):
    """The concept prompts' path: shares padded to one size for the collective, trimmed after it; a rank with
    no row (1 row, 2 ranks) still joins the backward collective instead of leaving the other waiting."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1", str(WORKER), "sharded", str(tmp_path / "out")]
    result = run_ranks(command, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "sharded.json").read_text())
    assert [r["shape"] for r in results] == [[1, 3], [2, 3], [5, 3]]
    assert all(r["values"] < 1e-6 and r["grad"] < 1e-5 for r in results), results


def test_killed_on_two_ranks_resumes_on_one(workspace: Path, tmp_path: Path):
    """Checkpoints do not depend on the world size: kill after epoch 1 on 2 ranks, finish on 1 process."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    metrics = worker.run("pretrain", workspace, reference)
    result = torchrun_worker("pretrain", workspace, resumed, "--kill-at-epoch", "1")
    assert result.returncode != 0 and "killed before epoch 1" in result.stderr
    assert not (resumed / "model").exists() and len(list((resumed / ".cache" / "checkpoints").rglob("last.pt"))) == 1
    worker.run("pretrain", workspace, resumed, resume=True)
    steps = json.loads((resumed / "steps.json").read_text())
    assert [s["step"] for s in steps if "train/loss" in s] == list(range(4, 7))  # only epoch 2 ran again
    weights = [load_file(d / "model" / "model.safetensors") for d in (reference, resumed)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=RTOL, atol=ATOL)
    assert json.loads((resumed / "model.json").read_text())["steps"] == metrics["steps"]


def test_two_machines_run_one_training(workspace: Path, tmp_path: Path, projects):
    """Two torchrun agents (``--nnodes 2``, one rank each) meet at a c10d rendezvous on 127.0.0.1
    and run ``lightclip pretrain`` to completion; rank 0 writes the teacher, its metrics and the MLflow run."""
    params = projects.tiny_params()
    params["pretrain"]["train"].update(epochs=1, batch_size=16)
    params["pretrain"]["concept_weight"] = 0.5
    project = projects.create(tmp_path / "project", params)
    port = free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lightclip-test", "--local-addr", "127.0.0.1"]
    stage = ["-m", "lightclip", "--project", str(project), "-q", "pretrain", "--in", str(workspace / "split"), "--kg", str(workspace / "kg"),
             "--out", "models/teacher", "--metrics", "metrics/pretrain.json"]
    machines = [
        subprocess.Popen([*base, "--node-rank", str(node), "--rdzv-conf", f"is_host={int(node == 0)}", *stage],
                         cwd=project, env=loopback_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=TIMEOUT_S))
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    for machine, (out, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-4000:]
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert metrics["steps"] == 48 // 16 and "test/mean_recall" in metrics
    assert (project / "models" / "teacher" / "model.safetensors").is_file()
    summaries = [out for out, _ in outputs if "teacher (lc-test-tiny" in out]
    assert len(summaries) == 1  # one summary line: rank 0's
    assert (project / "mlflow").exists()


def test_train_nproc_makes_lightclip_pretrain_start_its_ranks(workspace: Path, tmp_path: Path, projects, monkeypatch, capfd):
    """``pretrain.train.nproc: 2``: the plain command (as DVC and the Prefect flow run it) starts torchrun with 2 ranks."""
    params = projects.tiny_params()
    params["pretrain"]["train"].update(epochs=1, batch_size=16, nproc=2)
    params["pretrain"]["concept_weight"] = 0.5
    project = projects.create(tmp_path / "project", params)
    projects.enter(project, monkeypatch)
    for name, value in loopback_env().items():
        monkeypatch.setenv(name, value)
    code = cli_main(["-q", "pretrain", "--in", str(workspace / "split"), "--kg", str(workspace / "kg"),
                     "--out", "models/teacher", "--metrics", "metrics/pretrain.json"])
    captured = capfd.readouterr()
    assert code == 0, captured.err[-4000:]
    assert "launching 2 ranks" in captured.err
    assert "rank 0 of 2 joined the process group (gloo)" in captured.err and "rank 1 of 2 joined the process group (gloo)" in captured.err
    assert captured.out.count("teacher (lc-test-tiny") == 1
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == 48 // 16


# -- one process: the pieces ------------------------------------------------------------------


def test_the_ranks_slices_gathered_in_order_are_the_global_batch():
    rows = np.arange(100, 116)
    parts = [shard(rows, World(rank=r, size=4)) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), rows) and {len(p) for p in parts} == {4}
    assert shard(rows, World()) is rows  # one process: untouched
    assert local_size(128, World(size=2)) == 64
    with pytest.raises(DistributedError, match="does not split over 3 ranks"):
        local_size(16, World(size=3))


def test_one_process_is_the_identity_and_needs_no_process_group():
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    gathered = gather_pair(image, text, World())
    assert gathered[0] is image and gathered[1] is text
    assert not torch.distributed.is_initialized()
    assert not launched_by_torchrun({}) and not launched_by_torchrun({"WORLD_SIZE": "1"}) and launched_by_torchrun({"WORLD_SIZE": "2"})


def test_threads_are_shared_by_the_ranks_of_a_machine(monkeypatch):
    monkeypatch.setenv("LIGHTCLIP_THREADS", "8")
    monkeypatch.setattr("lightclip.io._BUDGET", None)
    assert threads_per_rank(None, World()) is None  # one process: the loop's own default
    assert threads_per_rank(None, World(rank=1, size=4, local_rank=1, local_size=4)) == 2
    assert threads_per_rank(3, World(size=4, local_size=4)) == 3  # configured: per rank


def test_the_process_count_is_not_part_of_the_run_key():
    assert checkpoint_key({"train": {"lr": 0.1, "nproc": 1}}) == checkpoint_key({"train": {"lr": 0.1, "nproc": 4}}) == checkpoint_key({"train": {"lr": 0.1}})


def test_nproc_runs_the_command_under_torchrun():
    command = torchrun_command(3, ["-q", "pretrain", "--resume"], port=12345)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "3" and "127.0.0.1:12345" in command
    assert command[-5:] == ["-m", "lightclip", "-q", "pretrain", "--resume"]
