"""Shared test setup: the repository root on sys.path, JAX on the CPU with one persistent
compilation cache for the whole session (subprocesses inherit it through the environment), the
tiny config, fabricated checkpoints (no training needed) and one trained reference run shared by
all workers; the worker count for `-n auto` and the order of the test files."""

from __future__ import annotations

import fcntl
import os
import runpy
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "tests", "site")  # sitecustomize.py: one cache key in every process
sys.path.insert(0, ROOT)
# Run by path: an interpreter that already loaded another sitecustomize would skip an import.
runpy.run_path(os.path.join(SITE, "sitecustomize.py"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every program the tests compile (here and in subprocesses) is compiled with LLVM at -O0,
# XLA:CPU's older fusion emitters and its LLVM module in one piece (the workers already fill the
# cores): the same numbers within the tests' tolerances, compiled faster (docs/performance.md).
# Users' programs keep XLA's defaults, which run faster. -O0 runs the loops XLA generates
# unvectorised: keep heavy work off XLA's generic convolution kernel (3x3 convolutions of 2x2
# maps: the feature net on 8x8 images runs its forward pass in 120 ms at -O0, 7 ms at -O1).
TEST_XLA_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  " --xla_cpu_parallel_codegen_split_count=1"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
os.environ.setdefault("DIFFUSION_MALLOC", "off")  # subprocesses: no re-exec
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.expanduser("~"), ".cache", "diffusion", "jax-tests"),
)
# Every program is stored, however fast it compiles: the numeric tests compile hundreds of small
# programs (0.05-0.2 s each). test_losses + test_gaussian, -n 0, warm: 62 s at 0.2, 20 s at 0.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from diffusion import runtime  # noqa: E402

runtime.configure_xla()  # launch.py's XLA flags, so in-process runs compile what launches compile

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import tiny  # noqa: E402

# The slowest test files first (the CPU time of their tests, subprocesses included, in a run of
# the whole suite from an empty compilation cache, four workers on a 2-core Xeon, 2026-12-05),
# and pyproject turns off pytest-xdist's own order (most tests first): the longest file started
# last would leave one worker running alone at the end.
SLOWEST_FIRST = (
  "test_fsdp.py",
  "test_train.py",
  "test_latent_eval.py",
  "test_dit.py",
  "test_few_step.py",
  "test_evaluate.py",
  "test_unet.py",
  "test_eval_protocol.py",
  "test_losses.py",
  "test_samplers.py",
  "test_latents.py",
  "test_launch.py",
  "test_sample_mode.py",
  "test_gcs.py",
  "test_autoencoding.py",
  "test_experiments.py",
  "test_model.py",
  "test_metrics_inception.py",
  "test_metrics_quality.py",
  "test_slurm_real.py",
  "test_checkpoint_faults.py",
  "test_posthoc_mode.py",
  "test_autoencoder.py",
  "test_data_shards.py",
  "test_parallel.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
  """`-n auto` (pyproject's default): two workers more than the CPUs this process may use. Part of
  the suite waits (subprocesses starting, SLURM, disks, polls) and the extra workers fill those
  waits: on the 2-core Xeon, 2 workers took 4 min 52 s, 3 took 4:30, 4 took 4:12-4:30."""
  return len(os.sched_getaffinity(0)) + 2


def pytest_collection_modifyitems(items: list) -> None:
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


# The tiny config as launch.py flags (the same settings as configs/tiny.py, for subprocesses that
# launch configs/tiny.py with extra flags).
TINY_CONFIG = "configs/tiny.py"


# A two-block DiT of width 16 on the tiny config's 8x8 images (16 tokens): config.model fields.
TINY_DIT = dict(arch="dit", patch_size=2, hidden_size=16, depth=2, num_heads=2)


def tiny_config(**train_overrides: Any) -> ml_collections.ConfigDict:
  """configs/tiny.py with config.train fields replaced (unlocked: tests edit it further)."""
  c = tiny.get_config()
  c.train.update(train_overrides)
  return c


def data_spec(**overrides: Any):
  """configs/default.py's config.data with `overrides`, as callers pass it to the data package:
  DataSpec(**config.data.to_dict())."""
  from configs.default import get_config
  from diffusion import data

  cfg = get_config().data
  cfg.update(overrides)
  return data.DataSpec(**cfg.to_dict())


def fabricate_checkpoints(
  config: ml_collections.ConfigDict, workdir: str, steps: Sequence[int], scale: float = 0.03
) -> None:
  """Checkpoints at `steps` in <workdir>/checkpoints whose params and EMA params are distinct
  random perturbations of a fresh state: no training, and a fresh U-Net (the zero function)
  would hide which parameters were used."""
  from diffusion import checkpoints, train
  from diffusion.model import Diffusion

  state = train.initial_state(
    Diffusion.from_config(config), train.optimizer(config.train), config.seed
  )
  params = jax.device_get(state.params)
  rng = np.random.default_rng(0)  # on the host: jax here compiles a small program per leaf shape

  def noisy():
    return jax.tree.map(
      lambda p: (p + scale * rng.standard_normal(p.shape)).astype(p.dtype), params
    )

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  for step in steps:
    ckpt.save(step, state.replace(step=np.int32(step), params=noisy(), ema_params=noisy()))
  ckpt.close()


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> str:
  """The workdir of an uninterrupted run of tiny_config(num_steps=4, checkpoint_every=2), the
  reference of the resume tests: trained once per test session, by the first worker that asks
  (the others wait on a lock in the folder all workers share). Read it, never write to it."""
  from diffusion import train

  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == "master" else root.parent
  path = root / "tiny_reference"
  with open(root / "tiny_reference.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / "tiny_reference.done").exists():
      train.train(tiny_config(num_steps=4, checkpoint_every=2), str(path))
      (root / "tiny_reference.done").touch()
  return str(path)


def _env(devices: int, env: dict | None) -> dict:
  return dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([ROOT, SITE]),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
    **(env or {}),
  )


def run_python(
  args: Sequence[str], *, devices: int = 1, env: dict | None = None, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
  """`python ARGS` in the repository root on `devices` fake CPU devices, output captured."""
  return subprocess.run(
    [sys.executable, *args],
    env=_env(devices, env),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


def popen_python(
  args: Sequence[str], *, devices: int = 1, env: dict | None = None
) -> subprocess.Popen:
  """`python ARGS` started in the background (stdout and stderr together, as text)."""
  return subprocess.Popen(
    [sys.executable, *args],
    env=_env(devices, env),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def processes(
  script: str, argv: Callable[[int, str], Sequence[str]], n: int, *, devices: int
) -> list[subprocess.Popen]:
  """`n` processes of `python -c script`, process i with arguments argv(i, port), where port is
  a free local port for their jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  return [popen_python(["-c", script, *argv(i, port)], devices=devices) for i in range(n)]


def launch(
  workdir: str,
  *flags: str,
  config: str = TINY_CONFIG,
  devices: int = 1,
  env: dict | None = None,
  wait: bool = True,
):
  """launch.py on the tiny config (or `config`) with extra flags; a Popen when not `wait`."""
  args = ["launch.py", "--config", config, "--workdir", str(workdir), *flags]
  if wait:
    return run_python(args, devices=devices, env=env)
  return popen_python(args, devices=devices, env=env)
