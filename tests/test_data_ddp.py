"""User data under DDP (issue 22): 2 CPU ranks (gloo) over a folder, an .npz file and a streamed folder. In every
epoch each example is served to at most one rank (all but the incomplete last batches), the evaluation loaders
serve every example exactly once, and a loader resumed mid-epoch from rank 0's state (what a checkpoint holds)
continues the same order on every rank."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo_ranks import run_ranks
from subprocess_runs import ROOT, cli, python_env, run
from user_data import make_folder, make_npz

from lightning_flows.data import GenerativeDataModule

BATCH = 8
STOP_AFTER = 3  # batches of the first epoch before the "kill"


def _levels(dm, x: torch.Tensor) -> torch.Tensor:
    return (dm.to_pixels(x) * (dm.levels - 1)).round().to(torch.uint8)


def _module(dataset: str, cache: str, streaming: bool) -> GenerativeDataModule:
    return GenerativeDataModule(dataset, batch_size=BATCH, eval_batch_size=5, cache_dir=cache, streaming=streaming,
                                conditional=True, num_workers=2 if streaming else 0)


KINDS = ("folder", "npz", "streamed folder")


def _worker(rank: int, world: int, root: str) -> None:
    # The ranks are spawned (gloo_ranks.run_ranks), so the streamed loader's workers would be spawned too (each
    # re-imports torch: ~15 s per epoch on a 2-core CPU); Lightning's ddp strategy launches its ranks as ordinary
    # processes, whose loader workers fork, which is what users run.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    for kind in KINDS:
        dataset, cache, streaming = _dataset(Path(root), kind)
        _serve(rank, dataset, cache, streaming, f"{root}/{kind.replace(' ', '_')}_rank{rank}.pt")


def _dataset(root: Path, kind: str) -> tuple[str, str, bool]:
    path = root / "a.npz" if kind == "npz" else root / "pets"
    return str(path), str(root / "cache"), kind.startswith("streamed")


def _serve(rank: int, dataset: str, cache: str, streaming: bool, out: str) -> None:
    """What one rank serves: two straight epochs, the same interrupted and resumed, and the test split."""
    dm = _module(dataset, cache, streaming)
    if rank == 0:  # Lightning's order: prepare_data on one process, then setup everywhere
        dm.prepare_data()
    torch.distributed.barrier()
    dm.setup()
    loader = dm.train_dataloader()
    straight = [(_levels(dm, x), y) for _ in range(2) for x, y in loader]
    interrupted = _module(dataset, cache, streaming).train_dataloader()
    iterator = iter(interrupted)
    before = [next(iterator) for _ in range(STOP_AFTER)]
    state = [interrupted.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(state, src=0)  # every rank resumes from rank 0's checkpoint
    del iterator
    resumed = _module(dataset, cache, streaming).train_dataloader()
    resumed.load_state_dict(state[0])
    # As Lightning does: the interrupted epoch's remaining batches (not asking past its end), then the next epoch.
    after = list(itertools.islice(iter(resumed), len(resumed) - STOP_AFTER)) + list(resumed)
    continued = [(_levels(dm, x), y) for x, y in before + after]
    test = list(dm.test_dataloader())
    torch.save({"batches": len(loader), "straight": straight, "continued": continued,
                "test": (torch.cat([_levels(dm, x) for x, _ in test]), torch.cat([y for _, y in test]))}, out)


def _which(served: torch.Tensor, examples: torch.Tensor) -> list[int]:
    """Index in ``examples`` of each served example (levels within one everywhere; see test_data_streaming)."""
    distance = (served.flatten(1).float()[:, None] - examples.flatten(1).float()[None]).abs().amax(-1)
    best = distance.argmin(1)
    assert (distance[torch.arange(len(served)), best] <= 1).all()
    return best.tolist()


@pytest.fixture(scope="module")
def ddp_served(tmp_path_factory):
    """One 2-rank gloo job serving every kind of data in turn (one start-up for all of them)."""
    root = tmp_path_factory.mktemp("ddp_data")
    make_npz(root / "a.npz", n=100)
    make_folder(root / "pets", 50)
    run_ranks(_worker, str(root), directory=root)
    return root


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_serve_each_example_once_per_epoch_and_resume_the_same_order(ddp_served, kind):
    dataset, cache, streaming = _dataset(ddp_served, kind)
    ranks = [torch.load(ddp_served / f"{kind.replace(' ', '_')}_rank{r}.pt", weights_only=True) for r in range(2)]
    reference = _module(dataset, cache, streaming=False)
    reference.setup()
    train, train_labels = reference.splits.train, reference.split_labels("train")

    assert ranks[0]["batches"] == ranks[1]["batches"] > STOP_AFTER  # equal steps keep DDP's collectives in step
    for epoch in range(2):
        per_rank = [r["straight"][epoch * r["batches"]:(epoch + 1) * r["batches"]] for r in ranks]
        served = [_which(torch.cat([x for x, _ in batches]), train) for batches in per_rank]
        assert not set(served[0]) & set(served[1])  # no example on both ranks
        assert all(len(set(s)) == len(s) for s in served)  # nor twice on one
        assert len(train) - sum(map(len, served)) < 2 * BATCH  # only incomplete batches are left out
        for batches, indices in zip(per_rank, served):  # the labels travel with their examples
            assert torch.equal(torch.cat([y for _, y in batches]), train_labels[indices])
    first, second = (set(_which(torch.cat([x for x, _ in ranks[0]["straight"][e * n:(e + 1) * n]]), train))
                     for e in range(2) for n in [ranks[0]["batches"]])
    assert first != second  # each epoch deals the examples out anew

    for r in ranks:  # resumed from rank 0's state: every rank continues its own order, batch for batch
        assert len(r["continued"]) == len(r["straight"])
        for (x, y), (x0, y0) in zip(r["continued"], r["straight"]):
            assert torch.equal(x, x0) and torch.equal(y, y0)

    # Evaluation: every test example exactly once over the two ranks, with its label.
    test = torch.cat([r["test"][0] for r in ranks])
    order = _which(test, reference.splits.test)
    assert sorted(order) == list(range(len(reference.splits.test)))
    assert torch.equal(torch.cat([r["test"][1] for r in ranks]), reference.split_labels("test")[order])



# ---- the whole path: `lightning-flows fit` streaming a folder on 2 ranks, killed mid-epoch, resumed ----
def _ddp_fit_args(root: Path, folder: Path, cache: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "experiments/digits/flow_matching.yaml"),
            "--model.init_args.backbone", "mlp", "--model.init_args.hidden", "32", "--model.init_args.depth", "2",
            "--model.init_args.sampler.steps", "2", "--data.dataset", str(folder), "--data.image_size", "8",
            "--data.streaming", "true", "--data.num_workers", "1", "--data.cache_dir", str(cache),
            "--data.batch_size", "8", "--trainer.max_steps", "14", "--checkpoint.every_n_train_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root), "--sample_grid.n", "4", *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_streamed_ddp_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    folder, cache = make_folder(tmp_path / "pets", 100, size=10), tmp_path / "cache"
    straight = run(cli(*_ddp_fit_args(tmp_path / "straight", folder, cache)), timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed, marker = tmp_path / "killed", tmp_path / "at_kill_step"
    job = subprocess.Popen(cli(*_ddp_fit_args(killed, folder, cache, "--trainer.callbacks+=fault_injection.PauseAtStep",
                                              "--trainer.callbacks.step", "8", "--trainer.callbacks.marker",
                                              str(marker))),
                           env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group: both ranks and their loader workers
    deadline = time.monotonic() + 400
    while not marker.exists():
        if job.poll() is not None or time.monotonic() > deadline:
            os.killpg(job.pid, 9)
            pytest.fail(job.communicate()[0][-3000:])
        time.sleep(0.1)
    os.killpg(job.pid, 9)  # SIGKILL to every rank: nothing is saved on the way out
    job.wait()
    (last,) = killed.glob("*/version_0/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6
    (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert 0 < loader_state["position"] < 10 and "stream" in loader_state  # mid-epoch, litdata's state inside

    resumed = run(cli(*_ddp_fit_args(killed, folder, cache, "--ckpt_path", "last")), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a,) = (tmp_path / "straight").glob("*/version_0/checkpoints/last.ckpt")
    (b,) = killed.glob("*/version_1/checkpoints/last.ckpt")
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a["global_step"] == b["global_step"] == 14
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    assert a["loops"]["fit_loop"]["state_dict"]["combined_loader"] == \
        b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
