"""clients/wsfloor.py: each server takes every byte and message its clients send before its CPU is reported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the server and the clients run on CPUs of their own")
def test_every_server_takes_all_its_clients_sent_and_a_figure_is_printed_for_each():
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, str(ROOT / "clients" / "wsfloor.py"), "--clients", "3", "--seconds", "1",
                          "--message-ms", "20", "--server-cpu", str(cpu)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # (it exits with the counts when a server took less than was sent)
    header, row = out.stdout.splitlines()[-2:]
    assert header.split() == ["clients", "tcp", "websockets", "deflate"]
    assert row.split()[0] == "3"
    figures = re.findall(r"(\d+\.\d+) \(\s*(\d+\.\d)\)", row)  # CPU s per stream-second (µs per message)
    assert len(figures) == 3, row


def test_a_cpu_the_process_may_not_use_is_refused_with_the_ones_it_may():
    out = subprocess.run([sys.executable, str(ROOT / "clients" / "wsfloor.py"), "--server-cpu", "4096"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--server-cpu 4096" in out.stderr and "may run on CPUs" in out.stderr


def test_a_count_of_no_clients_is_refused_with_what_to_give():
    out = subprocess.run([sys.executable, str(ROOT / "clients" / "wsfloor.py"), "--clients", "0,3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "give counts of one or more" in out.stderr
