"""Every stage under torchrun (gloo on CPU, one thread per rank): the same files as one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import same_artifact, tiny_config

import distilled_ssl
from distilled_ssl import distributed
from distilled_ssl.config import RunConfig
from distilled_ssl.layout import CONFIG_FILE, RESULTS_FILE, TARGETS_FILE, TEACHER_FILE

ROOT = Path(distilled_ssl.__file__).parent.parent
TIMEOUT_S = 120  # a hung collective fails the test instead of blocking the suite


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str], check: bool = True) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} hung:\n{out[-3000:]}")
    if check and proc.returncode:
        pytest.fail(f"{proc.args} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def _cli(*args: str) -> str:
    return _finish(_start("-m", "distilled_ssl.cli", *args))


def _torchrun(launch: list[str], *cli: str) -> subprocess.Popen[str]:
    """``torchrun LAUNCH -m distilled_ssl.cli CLI``."""
    return _start("-m", "torch.distributed.run", *launch, "-m", "distilled_ssl.cli", *cli)


TWO_RANKS = ["--standalone", "--nproc_per_node", "2"]


def _config(npz: Path, tmp: Path, **experts: int) -> Path:
    cfg = tiny_config(npz)
    cfg.threads = 1
    cfg.targets.batch_size = 64  # 240 images: two batches per rank
    cfg.distill.samples_per_iteration = 2
    for key, value in experts.items():
        setattr(cfg.experts, key, value)
    path = tmp / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


@pytest.fixture(scope="module")
def one_process(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run (K = 2 trajectory samples per iteration) in one plain process."""
    tmp = tmp_path_factory.mktemp("one")
    _cli("run", "--config", str(_config(synthetic_npz, tmp)), "--out", str(tmp / "run"), "-q")
    return tmp / "run"


def _rows(run: Path) -> list[dict[str, object]]:
    rows = json.loads((run / RESULTS_FILE).read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_shard_cuts_whole_batches_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = [distributed.shard(240, 64, of=r) for r in range(3)]
    assert parts == [range(0, 64), range(64, 128), range(128, 240)]
    assert [len(distributed.shard(2, 64, of=r)) for r in range(3)] == [0, 0, 2]


def test_two_ranks_write_what_one_process_writes(one_process: Path, synthetic_npz: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(one_process / TEACHER_FILE, out / TEACHER_FILE)  # DDP teachers are only close
    log = _finish(_torchrun(TWO_RANKS, "run", "--config",
                            str(_config(synthetic_npz, tmp_path)), "--out", str(out), "-q"))
    for name in ("targets.safetensors", "experts/expert_00000.safetensors",
                 "experts/expert_00001.safetensors", "init.safetensors", "distilled.safetensors"):
        assert same_artifact(one_process / name, out / name), name
    assert _rows(out) == _rows(one_process)
    assert log.count("distilled set:") == 1  # rank 0 alone reports


def test_two_nodes_on_localhost_form_one_job(one_process: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in (CONFIG_FILE, TEACHER_FILE):
        shutil.copy(one_process / name, run / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
                        "--master_addr", "127.0.0.1", "--master_port", str(port)],
                       "targets", "--out", str(run)) for r in (0, 1)]
    logs = [_finish(p) for p in nodes]
    assert same_artifact(one_process / TARGETS_FILE, run / TARGETS_FILE)
    assert sum("targets: done" in log for log in logs) == 1


def test_a_rank_killed_mid_experts_resumes_without_redoing_finished_ones(
        one_process: Path, synthetic_npz: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in (TEACHER_FILE, TARGETS_FILE):
        shutil.copy(one_process / name, run / name)
    cfg = RunConfig.from_yaml(_config(synthetic_npz, tmp_path, num_experts=4, epochs=30))
    cfg.distill.max_start_epoch = 29.0  # long trajectories: time to kill a rank in the middle
    (tmp_path / "long.yaml").write_text(cfg.to_yaml())
    experts = run / "experts"
    job = _torchrun(TWO_RANKS, "experts", "--config",
                    str(tmp_path / "long.yaml"), "--out", str(run), "-q")
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # rank 1 trains experts 1 and 3: kill it while it holds one, once expert 0 is done
        assert time.monotonic() < deadline and job.poll() is None, "rank 1 was never caught training"
        locks = sorted(experts.glob("expert_0000[13].lock"))
        if locks and (experts / "expert_00000.safetensors").exists():
            try:
                os.kill(json.loads(locks[0].read_text())["pid"], signal.SIGKILL)
                break
            except (FileNotFoundError, ValueError):  # released (or being written) meanwhile: look again
                pass
        time.sleep(0.02)
    _finish(job, check=False)
    finished = {p.name: p.stat().st_mtime_ns for p in experts.glob("expert_*[0-9].safetensors")}
    assert 0 < len(finished) < 4
    _finish(_torchrun(TWO_RANKS, "experts", "--out", str(run), "-q"))
    assert sorted(p.name for p in experts.glob("expert_?????.safetensors")) == \
        [f"expert_0000{k}.safetensors" for k in range(4)]
    assert not [*experts.glob("*.lock"), *experts.glob("*.partial.safetensors")]  # a SIGKILL may leave a .tmp
    assert {name: (experts / name).stat().st_mtime_ns for name in finished} == finished


DDP_GRADIENTS = """
import copy, os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from distilled_ssl.models.losses import barlow_twins_loss, nt_xent_loss
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
x1, x2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
rows = slice(16 * rank // world, 16 * (rank + 1) // world)
for loss in (barlow_twins_loss, nt_xent_loss):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    one = copy.deepcopy(model)
    whole = loss(one(x1), one(x2))
    whole.backward()
    ddp = DistributedDataParallel(model)
    part = loss(ddp(x1[rows]), ddp(x2[rows]), gather_distributed=True)
    part.backward()
    assert torch.allclose(part, whole, rtol=1e-5), (loss.__name__, part, whole)
    # to within float noise of the largest gradient: some are zero up to rounding (Barlow Twins
    # standardises each output over the batch, so the last bias's gradient is ~1e-7 of noise)
    scale = max(float(q.grad.abs().max()) for q in one.parameters())
    for p, q in zip(model.parameters(), one.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale), (loss.__name__, p.grad, q.grad)
print("gradients match on rank", rank, flush=True)
dist.destroy_process_group()  # a live gloo group at interpreter exit can abort ("terminate called ...")
os._exit(0)  # and so, under load, can gloo's own teardown at exit: skip the C++ destructors
"""


def test_ddp_teacher_gradients_match_one_process(tmp_path: Path) -> None:
    """Each rank's slice of the batch, the loss of the whole: DDP's averaged gradients are the
    single-process ones (not 1/world size of them)."""
    script = tmp_path / "ddp_gradients.py"
    script.write_text(DDP_GRADIENTS)
    out = _finish(_start("-m", "torch.distributed.run", *TWO_RANKS, str(script)))
    assert out.count("gradients match on rank") == 2
