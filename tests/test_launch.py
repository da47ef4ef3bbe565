"""The multirun's supervisor (bench/supervise.py, bench/launch.py's with_parent): a driver killed with SIGKILL
leaves no process of its command behind, grandchildren included (joblib's loky workers), and a command that
finishes passes its exit status through. Linux only (PR_SET_PDEATHSIG)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from bench.supervise import GRACE, with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The driver: starts the command under with_parent, as bench/launch.py does, and waits to be killed.
DRIVER = ("import subprocess, sys, time; from bench.supervise import with_parent; "
          "subprocess.Popen(with_parent(sys.argv[1:])); time.sleep(120)")
# The command, a stand-in for the Hydra multirun: a child that starts a grandchild (as loky starts its workers)
# and sleeps. The grandchild, once ready (ignoring SIGTERM when asked: then only the SIGKILL after GRACE ends
# it), records both pids, and sleeps.
GRANDCHILD = """
import os, signal, sys, time
if sys.argv[2] == "True":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getppid()} {os.getpid()}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""
COMMAND = "import subprocess, sys, time; subprocess.Popen([sys.executable, *sys.argv[1:]]); time.sleep(120)"


def alive(pid: int) -> bool:
    """A process that runs (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["plain", "ignores_sigterm"])
def test_a_killed_driver_leaves_no_process_of_its_command(tmp_path, ignores_sigterm):
    pid_file = tmp_path / "pids"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, sys.executable, "-c", COMMAND, "-c", GRANDCHILD,
                               str(pid_file), str(ignores_sigterm)], cwd=REPO)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert driver.poll() is None and time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(alive(p) for p in pids)
        driver.kill()  # SIGKILL: the driver runs no cleanup of its own
        driver.wait()
        deadline = time.monotonic() + GRACE + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "the command (child, grandchild) outlived its killed driver"
    finally:  # whatever failed: nothing of this test keeps running
        driver.kill()
        driver.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize(("code", "status"), [("raise SystemExit(0)", 0), ("raise SystemExit(3)", 3),
                                               ("import os; os.kill(os.getpid(), 9)", 128 + 9)])
def test_the_exit_status_passes_through(code, status):
    proc = subprocess.run(with_parent([sys.executable, "-c", code]), cwd=REPO, timeout=60, check=False)
    assert proc.returncode == status
