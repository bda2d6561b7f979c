"""Loaded by the tests' subprocesses (conftest puts this folder on their PYTHONPATH) and by
conftest itself.

On CPUs, jax 0.10 keys compilation-cache entries by a topology fingerprint that differs between
the processes of one multi-process run, and only process 0 writes entries: every other process
compiled everything from scratch in every test (10-20 s per launch). Here the key hashes each
device's kind, id and process index instead, the same in every process of a run, so all of them
read the entries that process 0 wrote. A run's shape (processes x devices) still changes the key.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "jax._src.cache_key"


def _hash_device_layout(hash_obj, devices) -> None:
  for d in devices.flat:
    hash_obj.update(f"{d.device_kind}/{d.id}/{d.process_index};".encode())


class _Patch(importlib.abc.MetaPathFinder):
  """Replaces cache_key._hash_accelerator_config right after jax imports that module."""

  def find_spec(self, name, path, target=None):
    if name != TARGET:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      if hasattr(module, "_hash_accelerator_config"):
        module._hash_accelerator_config = _hash_device_layout

    spec.loader.exec_module = exec_module
    return spec


if TARGET in sys.modules:
  sys.modules[TARGET]._hash_accelerator_config = _hash_device_layout
else:
  sys.meta_path.insert(0, _Patch())
