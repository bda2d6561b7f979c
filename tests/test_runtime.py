"""diffusion/runtime.py: the default XLA flags and the one-time malloc re-exec."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
from diffusion import runtime
print("before", os.getpid(), flush=True)
runtime.relaunch_with_malloc_tunables()
runtime.configure_xla()
print(json.dumps({{"pid": os.getpid(), "argv": sys.argv[1:], "mode": runtime.malloc_mode(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "xla": os.environ.get("XLA_FLAGS", "")}}))
"""


def probe(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("DIFFUSION_MALLOC", "_DIFFUSION_MALLOC_APPLIED", "GLIBC_TUNABLES")
  }
  return subprocess.run(
    [sys.executable, "-c", PROBE.format(root=ROOT), *args],
    text=True,
    capture_output=True,
    env={**env, **env_extra},
    timeout=60,
  )


@pytest.mark.skipif(
  sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
  reason="the re-exec applies to glibc Linux only",
)
def test_relaunch_applies_hugepages_once_keeping_pid_and_arguments():
  out = probe({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "--a", "b")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert [line.split()[0] for line in lines[:-1]] == ["before", "before"]  # exactly one re-exec
  result = json.loads(lines[-1])
  assert result["pid"] == int(lines[0].split()[1])
  assert result["argv"] == ["--a", "b"]
  assert result["mode"] == "hugepages"
  assert result["tunables"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"  # user's kept
  assert "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in result["xla"]


def test_relaunch_off_and_bad_mode():
  out = probe({"DIFFUSION_MALLOC": "off", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=x"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("before") == 1
  result = json.loads(out.stdout.splitlines()[-1])
  assert (result["mode"], result["tunables"]) == ("off", "")
  assert result["xla"] == "--xla_cpu_experimental_ynn_fusion_type=x"  # the user's choice wins
  bad = probe({"DIFFUSION_MALLOC": "reuse"})
  assert bad.returncode != 0 and "DIFFUSION_MALLOC='reuse' is not one of" in bad.stderr
  assert "unset it" in bad.stderr
