"""Default XLA and host-memory settings for speed, applied before JAX starts its backends."""

from __future__ import annotations

import os
import platform
import signal
import sys

# XLA:CPU in jax 0.10 sends convolutions to YNNPACK, about half as fast as its Eigen path on
# the 2-core x86 machines measured (see README, Performance); this moves them back.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def configure_xla() -> None:
  """Adds the default flags to XLA_FLAGS unless the user already set them. Call before the
  first JAX computation."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def configure_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache, shared by every mode and run: a relaunch, a
  resume, sampling and eval load compiled programs instead of compiling again. Folder:
  $DIFFUSION_COMPILE_CACHE ("off" disables it), else $JAX_COMPILATION_CACHE_DIR, else
  <$XDG_CACHE_HOME or ~/.cache>/diffusion/jax. Programs that compile in under 0.5 s are not
  stored ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides). Returns the folder or None.
  Call before the first compilation."""
  import jax

  folder = os.environ.get("DIFFUSION_COMPILE_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if folder == "off":
    return None
  if not folder:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "diffusion", "jax")
  jax.config.update("jax_compilation_cache_dir", folder)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return folder


# XLA:CPU allocates each call's temporary buffers afresh (245 MB per training step of the peer
# network); glibc serves blocks that large with a new mmap, so every step faults them in 4 KiB at a
# time (73k page faults, ~30% of the step's CPU time). Modes, chosen by $DIFFUSION_MALLOC:
#   hugepages (default): glibc.malloc.hugetlb=1, fresh blocks come in 2 MiB pages (peer network
#     201 -> 271 images/s);
#   off: glibc's defaults.
# (One arena without mmap, so that freed blocks are reused, removed the faults in a blocking
# loop but ran the cifar10 step at half speed with 7 GB in the benchmark: not offered.)
MALLOC_MODES = {"hugepages": "glibc.malloc.hugetlb=1", "off": ""}


def relaunch_with_malloc_tunables(hold_signals: tuple[int, ...] = ()) -> None:
  """Re-executes this process (same pid, same command line) once with the glibc tunables of
  $DIFFUSION_MALLOC, which glibc reads only at start-up. No-op off glibc Linux, for mode "off",
  or when already applied. Call first thing in a program's `__main__` block. `hold_signals` stay
  blocked across the exec (pending, not lost): the new image unblocks them once its handlers
  are installed."""
  mode = os.environ.get("DIFFUSION_MALLOC", "hugepages")
  if mode not in MALLOC_MODES:
    raise ValueError(
      f"DIFFUSION_MALLOC={mode!r} is not one of {sorted(MALLOC_MODES)}; unset it "
      "for the default (hugepages)."
    )
  if (
    not MALLOC_MODES[mode]
    or os.environ.get("_DIFFUSION_MALLOC_APPLIED")
    or sys.platform != "linux"
    or platform.libc_ver()[0] != "glibc"
  ):
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), MALLOC_MODES[mode]) if t)
  env = {**os.environ, "GLIBC_TUNABLES": tunables, "_DIFFUSION_MALLOC_APPLIED": mode}
  sys.stdout.flush()
  sys.stderr.flush()
  if hold_signals:
    signal.pthread_sigmask(signal.SIG_BLOCK, hold_signals)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def malloc_mode() -> str:
  """The malloc mode this process runs with ("off" when none was applied)."""
  return os.environ.get("_DIFFUSION_MALLOC_APPLIED", "off")


def provenance() -> dict[str, object]:
  """What ran a job: {"devices", "processes", "jax_version", "backend"} (JAX starts if needed)."""
  import jax

  return {
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
  }
