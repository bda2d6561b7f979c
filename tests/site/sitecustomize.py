"""Loaded by the tests' subprocesses (conftest puts this folder on their PYTHONPATH) and by
conftest itself.

On CPUs, jax 0.10 keys compilation-cache entries by a topology fingerprint that differs between
the processes of one multi-process run and by the global device ids in the compile options, and
only process 0 writes entries: every other process compiled everything from scratch in every test
(its initial state alone takes 12 s). Here the key hashes, for each device of the program, its
kind, its process relative to the program's first process and its rank among the program's
devices of that process, and leaves the device ids out of the compile options (as jax does on
GPUs). Process 1's programs on
its own devices then read the entries process 0 wrote for the same programs on its devices, and
all processes share the entries of the programs over all devices. A run's shape (processes x
devices) still changes the key; the executable is loaded for the caller's devices.

It also makes Python's cyclic garbage collector run less often: tracing creates many short-lived
objects, and at the default threshold the collector took a tenth of a short training's CPU time
(docs/performance.md).
"""

import gc
import importlib.abc
import importlib.util
import sys

TARGET = "jax._src.cache_key"


def _hash_device_layout(hash_obj, devices) -> None:
  """Each device as (kind, process relative to the first, rank by id among this program's devices
  of its process): the same in every process, whichever devices a process can address."""
  first = min(d.process_index for d in devices.flat)
  for d in devices.flat:
    rank = sorted(e.id for e in devices.flat if e.process_index == d.process_index).index(d.id)
    hash_obj.update(f"{d.device_kind}/{d.process_index - first}/{rank};".encode())


def _patch(module) -> None:
  hash_options = module._hash_serialized_compile_options

  def without_device_ids(hash_obj, compile_options, strip_device_assignment=False):
    return hash_options(hash_obj, compile_options, strip_device_assignment=True)

  module._hash_accelerator_config = _hash_device_layout
  module._hash_serialized_compile_options = without_device_ids


class _Patch(importlib.abc.MetaPathFinder):
  """Patches cache_key right after jax imports that module."""

  def find_spec(self, name, path, target=None):
    if name != TARGET:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      if hasattr(module, "_hash_accelerator_config"):
        _patch(module)

    spec.loader.exec_module = exec_module
    return spec


gc.set_threshold(50_000, 20, 20)

if TARGET in sys.modules:
  _patch(sys.modules[TARGET])
else:
  sys.meta_path.insert(0, _Patch())
