"""``python -m deepscope.serve.lifeline COMMAND...``: run a training job of ``deepscope serve`` for as long as the server
lives, so that a server killed with ``kill -9`` (or crashing) leaves no training behind.

The server starts this wrapper as the leader of a new process group, with the write end of a pipe as the other end of
its stdin. Nothing is ever written to it: when the server process is gone, however it died, the kernel closes the
pipe and the wrapper reads end-of-file; it then stops its whole process group (the job and any data-loading workers it
started): SIGTERM, and SIGKILL after ``KILL_AFTER_S``. As a second check it also stops the group once its parent
process has changed (a process the server forked without exec could hold a copy of the pipe's end after the server
died).

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) is not used: it fires when the *thread* that started the
child exits, and the server starts jobs from worker threads that come and go, which would kill jobs while the
server is well. The wrapper imports nothing heavy, so it costs a few MB and milliseconds per job.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading

KILL_AFTER_S = 5.0  # a job being stopped has this long to exit on SIGTERM before its group is killed
CHECK_PARENT_S = 1.0  # how often the parent is checked while the pipe stays open


def server_gone(parent: int) -> bool:
    """Block until the server is gone: end-of-file on stdin, or a parent other than ``parent``."""
    while True:
        readable, _, _ = select.select([0], [], [], CHECK_PARENT_S)
        if readable and not os.read(0, 4096):
            return True
        if os.getppid() != parent:
            return True


def stop_group(job: subprocess.Popen) -> None:
    """SIGTERM to this process group (the wrapper ignores it), SIGKILL to all of it once the job exited or after
    ``KILL_AFTER_S``: no worker of the job survives."""
    os.killpg(0, signal.SIGTERM)
    try:
        job.wait(KILL_AFTER_S)
    finally:
        os.killpg(0, signal.SIGKILL)


def main(command: list[str]) -> int:
    """Run ``command`` (stdin closed) until it exits, or until the server is gone; the job's exit status."""
    if not command:
        print("usage: python -m deepscope.serve.lifeline COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    if os.getpgrp() != os.getpid():  # not started as a group leader (by hand): stopping "its group" must not hit others
        os.setpgid(0, 0)
    # the group's SIGTERM (a cancel from the server) is for the job: wait for it to exit rather than die first. A
    # handler, not SIG_IGN: handlers are reset in the job when it starts, an ignored signal would stay ignored there
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    job = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    stopping = threading.Event()

    def watch() -> None:
        if server_gone(parent):
            stopping.set()
            stop_group(job)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = job.wait()
    if stopping.is_set():
        watcher.join()  # until the group's SIGKILL, this process included: the job's workers must not outlive it
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
