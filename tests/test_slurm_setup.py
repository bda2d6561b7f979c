"""test_slurm_real's SLURM setup, on a fake `sinfo` and fake setup scripts: a running node is
used as it is, a stopped one is started by the setup script, and a setup that cannot start it
fails the test with the script's own message (CI fails; nothing is skipped)."""

import os

import pytest
from test_slurm_real import ensure_slurm

SINFO = """#!/bin/sh
[ -e "$FAKE_SLURM_UP" ] && echo idle && exit 0
echo "sinfo: error: Unable to contact slurm controller (connect failure)" >&2
exit 1
"""


def script(path, text: str) -> str:
  path.write_text(text)
  path.chmod(0o755)
  return str(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """A `sinfo` first on PATH that answers "idle" once the marker file exists."""
  (tmp_path / "bin").mkdir()
  script(tmp_path / "bin" / "sinfo", SINFO)
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SLURM_UP", str(tmp_path / "up"))
  return tmp_path


def test_a_stopped_slurm_is_started_by_the_setup_script(fake):
  setup = script(fake / "up.sh", '#!/bin/sh\ntouch "$FAKE_SLURM_UP"\n')
  ensure_slurm(setup)
  assert (fake / "up").exists()


def test_a_running_slurm_is_left_alone(fake):
  (fake / "up").touch()
  ensure_slurm(script(fake / "up.sh", '#!/bin/sh\ntouch "$FAKE_SLURM_UP.ran"\n'))
  assert not (fake / "up.ran").exists()


def test_a_setup_that_cannot_start_slurm_fails_with_its_message(fake):
  setup = script(
    fake / "up.sh", '#!/bin/sh\necho "slurm_up.sh: run as root (or with sudo)" >&2\nexit 1\n'
  )
  with pytest.raises(
    pytest.fail.Exception,
    match=r"could not start it \(exit 1, node state None\)"
    r": slurm_up.sh: run as root",
  ):
    ensure_slurm(setup)
  # A setup that exits 0 without a node taking jobs fails too.
  with pytest.raises(pytest.fail.Exception, match=r"exit 0, node state None"):
    ensure_slurm(script(fake / "noop.sh", "#!/bin/sh\n"))
