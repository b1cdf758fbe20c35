"""``deepscope serve`` beyond one process: a job dies with the server (``kill -9`` included) but not with the thread
that started it, and a second server on a folder is refused with the first one's address, until the first is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
import uvicorn
from PIL import Image

from conftest import start_server
from deepscope.cli import main
from deepscope.serve.app import serve
from deepscope.serve.claim import INFO_FILE, FolderServedError, claim_folder
from deepscope.serve.folder import STATE_DIR
from test_serve_jobs import SMALL, sparse_labels, two_regions

LIFELINE = [sys.executable, "-m", "deepscope.serve.lifeline"]


def group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # ended while listed
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_until(condition, what: str, limit: float = 30) -> None:
    """Bounded wait, so that a hang fails the test."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


def test_a_job_survives_the_thread_that_started_it_and_dies_with_its_server() -> None:
    """A stand-in server (plain Python) starts a job from a thread that then ends, as the real one does from worker
    threads; the job, and the process it started, live on until the server is killed with SIGKILL."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import subprocess, sys, threading, time
jobs = []
starter = threading.Thread(target=lambda: jobs.append(subprocess.Popen(
    {LIFELINE!r} + ["sh", "-c", "sleep 600 & sleep 600"], stdin=subprocess.PIPE, start_new_session=True)))
starter.start()
starter.join()
print(jobs[0].pid, flush=True)
time.sleep(600)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        job = int(server.stdout.readline())
        wait_until(lambda: len(group(job)) >= 3, "saw the job and its two sleeps")  # the lifeline, (sh,) two sleeps
        started = group(job)
        time.sleep(0.5)  # a parent-death signal tied to the starting thread would have fired by now
        assert group(job) == started
    finally:
        server.kill()
        server.wait()
    wait_until(lambda: not group(job), "stopped the job's process group after the server was killed", limit=15)


@pytest.mark.parametrize(("command", "status"), [(["sh", "-c", "exit 3"], 3), (["sh", "-c", "kill -9 $$"], 128 + 9)])
def test_lifeline_passes_the_exit_status_on(command: list[str], status: int) -> None:
    job = subprocess.Popen([*LIFELINE, *command], stdin=subprocess.PIPE)  # stdin open: the "server" lives
    try:
        assert job.wait(30) == status
    finally:
        job.stdin.close()


def test_a_second_server_is_refused_and_a_stale_address_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[int] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(sockets[0].getsockname()[1]))
    info = tmp_path / STATE_DIR / INFO_FILE
    with claim_folder(tmp_path) as announce:
        assert main(["serve", str(tmp_path), "--port", "0"]) == 2  # the folder is being claimed: no address yet
        assert "is already served by another deepscope serve that is starting" in capsys.readouterr().err
        announce("http://127.0.0.1:8123/")
        assert main(["serve", str(tmp_path), "--port", "0"]) == 2
        assert capsys.readouterr().err == (
            f"error: {tmp_path} is already served by http://127.0.0.1:8123/ (pid {os.getpid()}); "
            "open that address, or stop that server first\n"
        )
    assert not served and not info.exists()  # removed when the holder stopped

    info.write_text('{"url": "http://127.0.0.1:1/", "pid": 99999999}')  # left by a server killed with -9
    assert main(["serve", str(tmp_path), "--port", "0"]) == 0
    assert f"open http://127.0.0.1:{served[0]}/" in capsys.readouterr().out and not info.exists()


def test_kill_9_of_the_server_stops_its_job_and_frees_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        Image.fromarray(two_regions(rng)).save(tmp_path / f"{name}.png")
        tifffile.imwrite(tmp_path / "labels" / f"{name}.tif", sparse_labels())
    server, url = start_server(tmp_path)
    try:
        job = httpx.post(
            f"{url}api/jobs",
            json={"kind": "segment", "epochs": 100000, "max_minutes": 600, "settings": SMALL},
            timeout=60,
        ).json()
        assert job["state"] == "running", job
        wait_until(lambda: len(group(job["pid"])) >= 2, "saw the training process")  # the lifeline and the training

        monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: pytest.fail("a second server ran"))
        with pytest.raises(FolderServedError, match=re.escape(f"already served by {url} (pid {server.pid})")):
            serve(tmp_path, port=0)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    wait_until(lambda: not group(job["pid"]), "stopped the job after the server was killed", limit=15)
    with claim_folder(tmp_path):  # the kill released the folder, although its address file is still there
        assert url in (tmp_path / STATE_DIR / INFO_FILE).read_text()
