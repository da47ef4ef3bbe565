"""A command that ends, with every process it starts, when the process that launched it dies (Linux).

    python -m bench.supervise PARENT_PID CMD...   (what with_parent(CMD) returns; from the repository root)

PR_SET_PDEATHSIG reaches one process only. Set in the Hydra multirun itself, it ended the multirun with its
killed driver, but not joblib's loky workers, the driver's grandchildren, which trained on as orphans for
minutes after a `kill -9` of scripts/bench.py. So this process takes the death signal itself and starts the
command as its child in a session (process group) of its own; the death signal, SIGTERM, SIGINT or SIGHUP then
end the whole group: SIGTERM, and SIGKILL GRACE seconds later for whatever is left. Its exit status is the
command's (128 + N for a command ended by signal N). Standard library only: it lives as long as the runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GRACE = 5  # seconds between the group's SIGTERM and its SIGKILL


def with_parent(cmd: list[str]) -> list[str]:
    """`cmd` under this supervisor on Linux, for a subprocess.Popen in this process with cwd = the repository
    (the supervisor checks that its parent is this process), from a thread that outlives the command: the
    kernel sends the death signal when the thread that started it exits. Elsewhere `cmd` as it is."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-m", "bench.supervise", str(os.getpid()), *cmd]


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the process group `pgid`; False once no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    proc: subprocess.Popen | None = None
    caught: list[int] = []  # the signals received
    ending = False  # the group has been told to end

    # The handlers only signal and record, never raise: a signal that comes while the command starts (proc not
    # yet set) is acted on just after, and none leaves a step half done.
    def end() -> None:
        nonlocal ending
        if proc is not None and not ending:
            ending = True
            signal_group(proc.pid, signal.SIGTERM)
            signal.alarm(GRACE)  # SIGALRM (below): SIGKILL for a group, leader included, outlasting SIGTERM

    def stop(signum: int, _frame: object) -> None:
        caught.append(signum)
        end()

    signal.signal(signal.SIGALRM, lambda *_: proc is not None and signal_group(proc.pid, signal.SIGKILL))
    signal.signal(signal.SIGTERM, stop)  # the death signal, `kill`, launch's terminate()
    for sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C, a closed terminal: the group is off the terminal's
        if signal.getsignal(sig) is not signal.SIG_IGN:  # what the caller ignores (nohup, `&`) stays ignored
            signal.signal(sig, stop)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if caught or os.getppid() != parent:  # stopped, or the launcher died, before the death signal was armed
        return 128 + (caught[0] if caught else signal.SIGTERM)
    proc = subprocess.Popen(cmd, start_new_session=True)  # its pid is its process group's id
    if caught:
        end()
    code = proc.wait()
    if ending:  # the leader is gone; the group's other members (loky's workers) may not be yet
        deadline = time.monotonic() + GRACE
        while signal_group(proc.pid, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_group(proc.pid, signal.SIGKILL)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
