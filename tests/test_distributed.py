"""cellvit_ssl.distributed: launcher environment, sharded sampling, and multi-process training
(2 gloo processes under torchrun) against a single process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl import distributed as D
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import config_from_dict, load_config
from cellvit_ssl.ssl import teacher_backbone_state
from cellvit_ssl.train import Trainer, resolve_index

TINY_DIST = [*TINY_OVERRIDES, "data.demo.n_images=4", "train.epochs=2", "train.warmup_epochs=1",
             "train.base_lr=0.05", "train.tensorboard=false", "train.progress=false", "train.resume=none",
             "train.deterministic=true",
             # iBOT masks and KoLeo neighbours are per process (as in DINOv2): only DINO with
             # Sinkhorn-Knopp centring (summed over ranks) is exactly batch-split invariant.
             "ssl.ibot=false", "ssl.koleo=false", "ssl.centering=sinkhorn_knopp"]
ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from cellvit_ssl import distributed as D
from cellvit_ssl.config import config_from_dict, load_config
from cellvit_ssl.ssl import teacher_backbone_state
from cellvit_ssl.train import Trainer
info = D.init_distributed("cpu", "gloo")
assert info.world_size == 2, info
for overrides in json.loads(open(sys.argv[1]).read()):
    Trainer(load_config(None, overrides), info).fit()
D.cleanup()
"""


def test_slurm_environment_becomes_torch_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so monkeypatch records the original state and undoes what
        # _env_from_slurm writes; a leaked WORLD_SIZE=8 makes later tests wait for 8 ranks.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[012-015,020],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    D._env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu012"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert D._first_host("node7") == "node7"
    assert D._first_host("a[3,5]") == "a3"


def test_torchrun_environment_wins_over_slurm(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    D._env_from_slurm()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"


def test_a_batch_script_in_a_multi_task_allocation_is_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # the allocation, not an srun step
    D._env_from_slurm()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model
    with pytest.raises(Exception, match="train.strategy"):
        D.wrap_model(model, info, strategy="zero3")


def _batches(sampler, batch, skip=0):
    items = list(sampler)
    return [items[i : i + batch] for i in range(0, len(items) - batch + 1, batch)]


@pytest.mark.parametrize("epoch", [0, 3])
def test_ranks_split_each_global_batch_of_a_single_process(epoch):
    data = list(range(23))
    single = D.ShardedSampler(data, D.DistInfo(0, 1, 0, torch.device("cpu")), seed=7)
    ranks = [D.ShardedSampler(data, D.DistInfo(r, 2, r, torch.device("cpu")), seed=7) for r in range(2)]
    for s in [single, *ranks]:
        s.set_position(epoch)
    one = _batches(single, 4)
    per_rank = [_batches(s, 2) for s in ranks]
    assert len(one) == len(per_rank[0]) == len(per_rank[1]) == 5
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(per_rank[0][k] + per_rank[1][k])
    assert {e for e, _ in sum(one, [])} == {epoch}
    # another epoch is another order
    other = D.ShardedSampler(data, D.DistInfo(0, 1, 0, torch.device("cpu")), seed=7)
    other.set_position(epoch + 1)
    assert [i for _, i in other] != [i for b in one for _, i in b] + [i for _, i in list(single)[20:]]


def test_sampler_resumes_mid_epoch():
    data = list(range(10))
    info = D.DistInfo(1, 2, 1, torch.device("cpu"))
    full = D.ShardedSampler(data, info, seed=0)
    full.set_position(2)
    late = D.ShardedSampler(data, info, seed=0)
    late.set_position(2, skip=3)
    assert list(late) == list(full)[3:] and len(late) == len(full) - 3


def _overrides(tmp_path, name, batch, extra=()):
    return [
        *TINY_DIST,
        f"data.demo.cache_dir={tmp_path / 'demo'}",
        f"train.output_dir={tmp_path / name}",
        f"data.batch_size={batch}",
        *extra,
    ]


def _single_process(overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = D.DistInfo(0, 1, 0, torch.device("cpu"))
        Trainer(load_config(None, overrides), info).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def _two_gloo_processes(tmp_path, runs, timeout):
    """Train every run of ``runs`` (override lists) under torchrun on two gloo processes."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """DDP (2 x batch 2), FSDP2 (2 x batch 2) and FSDP2 resumed from a DDP checkpoint end where one
    process with batch 4 ends."""
    resolve_index(load_config(None, _overrides(tmp_path, "x", 4)))  # demo data made once
    runs = [_overrides(tmp_path, "ddp", 2, ["train.strategy=ddp"]),
            _overrides(tmp_path, "fsdp", 2, ["train.strategy=fsdp"]),
            # FSDP resuming from the DDP run's epoch-1 checkpoint (checkpoints are portable)
            _overrides(tmp_path, "fsdp_resumed", 2, ["train.strategy=fsdp",
                                                      f"train.resume={tmp_path / 'ddp' / 'checkpoint_00000003.pt'}"])]
    _two_gloo_processes(tmp_path, runs, timeout=600)
    _single_process(_overrides(tmp_path, "single", 4))

    reference = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert reference["step"] == 6
    for name in ("ddp", "fsdp", "fsdp_resumed"):
        ckpt = load_checkpoint(tmp_path / name / "checkpoint.pt")
        assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
        assert ckpt["model"].keys() == reference["model"].keys()
        for key, value in reference["model"].items():
            torch.testing.assert_close(ckpt["model"][key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")
        # the teacher export of a sharded run is the full teacher backbone
        export = torch.load(tmp_path / name / "teacher.pt", weights_only=True)["backbone"]
        expected = teacher_backbone_state(reference["model"], config_from_dict(reference["config"]))
        assert export.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(export[key], value, atol=1e-6, rtol=0, msg=f"{name} export: {key}")
    # training moved the weights between the epoch-end checkpoints: the equality is not trivial
    mid = load_checkpoint(tmp_path / "single" / "checkpoint_00000003.pt")["model"]
    key = "student.backbone.backbone.blocks.0.attn.qkv.weight"
    assert (mid[key] - reference["model"][key]).abs().max() > 1e-4


def _distill_teacher_file(tmp_path):
    """A training checkpoint of a wider tiny teacher (random weights; its heads give the targets)."""
    from cellvit_ssl.checkpoint import STATE_LAYOUT, TRAINING_FORMAT, save_checkpoint
    from cellvit_ssl.config import config_to_dict
    from cellvit_ssl.models.channels import build_model
    from cellvit_ssl.ssl import DINOMetaArch

    cfg = load_config(None, [*TINY_OVERRIDES, "model.embed_dim=48", "model.num_heads=3"])
    torch.manual_seed(3)
    meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels)), cfg.ssl)
    return save_checkpoint({"format": TRAINING_FORMAT, "state_layout": STATE_LAYOUT, "config": config_to_dict(cfg),
                            "model": meta.state_dict()}, tmp_path / "teacher" / "checkpoint.pt")


def test_distillation_on_two_gloo_processes_equals_one_process(tmp_path):
    """A student distilled (with Gram anchoring) under DDP and FSDP2 (2 x batch 2) ends where one
    process with batch 4 ends.

    Unmasked distillation (the default) has no per-process masks, so iBOT is batch-split invariant
    too: its Sinkhorn-Knopp targets are normalised over both processes.
    """
    teacher = _distill_teacher_file(tmp_path)
    # Gram anchoring too (its snapshot is copied shard by shard under FSDP): refreshed at steps 2 and 4
    distill = [f"distill.teacher={teacher}", "ssl.ibot=true", "ssl.gram.enabled=true", "ssl.gram.start_step=2",
               "ssl.gram.refresh_every=2"]
    resolve_index(load_config(None, _overrides(tmp_path, "x", 4)))
    runs = [_overrides(tmp_path, "ddp", 2, ["train.strategy=ddp", *distill]),
            _overrides(tmp_path, "fsdp", 2, ["train.strategy=fsdp", *distill])]
    _two_gloo_processes(tmp_path, runs, timeout=900)
    _single_process(_overrides(tmp_path, "single", 4, distill))
    reference = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert reference["step"] == 6 and reference["distill_teacher"]["path"] == str(teacher)
    for name in ("ddp", "fsdp"):
        ckpt = load_checkpoint(tmp_path / name / "checkpoint.pt")
        assert ckpt["world_size"] == 2 and ckpt["model"].keys() == reference["model"].keys()
        for key, value in reference["model"].items():
            torch.testing.assert_close(ckpt["model"][key], value, atol=1e-6, rtol=0, msg=f"{name}: {key}")
    records = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ibot"] > 0 for r in records) and "gram" in records[-1]
    assert any(k.startswith("gram_teacher.") for k in reference["model"])
    key = "student.backbone.backbone.blocks.0.attn.qkv.weight"
    mid = load_checkpoint(tmp_path / "single" / "checkpoint_00000003.pt")["model"]
    assert (mid[key] - reference["model"][key]).abs().max() > 1e-4
