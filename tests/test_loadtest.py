"""clients/loadtest.py against a real daemon: clients spread over client processes, their figures merged."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import pcm16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients"))  # the spawned processes inherit it

import loadtest  # noqa: E402


async def test_loadtest_procs_spreads_clients_and_merges_their_figures(daemon_factory, speech):
    """Two client processes with one client each: both streams' words and latencies land in one level's figures,
    with the server process of each stream and the ping probe's round trips."""
    d = await daemon_factory()
    pcm = pcm16(speech[: 16000 * 4])
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        lv = await loadtest.run_level(f"ws://127.0.0.1:{d.port}/v1/stream", pcm, 2, None, pool, procs=2)
    assert lv["ok"] and lv["clients"] == 2
    assert lv["client_processes"] == 2  # one client in each process
    assert sum(lv["servers"].values()) == 2  # every stream says where it was served
    assert lv["words"] >= 2 * 4  # "turn on the kitchen lights" twice: both processes' finals were merged
    for key in ("partial_median", "partial_p95", "final_median", "final_p95", "ping_median"):
        assert np.isfinite(lv[key]) and lv[key] >= 0, key
    assert int(d.metrics.streams_total.labels("native")._value.get()) >= 2 + 1  # the clients and the ping probe


async def test_finals_only_clients_get_their_finals_and_the_daemon_forms_no_partials(daemon_factory, speech):
    """``--finals-only``: each client's start asks for finals only; the level has the words of both streams' finals
    (their words are first shown in the finals), and the daemon counted no partial."""
    d = await daemon_factory()
    pcm = pcm16(speech[: 16000 * 4])
    lv = await loadtest.run_level(f"ws://127.0.0.1:{d.port}/v1/stream", pcm, 2, None,
                                  start={"type": "start", "partials": False})
    assert lv["ok"] and lv["words"] >= 2 * 4 and np.isfinite(lv["final_median"])
    assert not d.metrics.registry.get_sample_value("streamer_events_total", {"type": "partial"})


async def test_message_ms_sends_each_clients_audio_in_messages_of_that_length(daemon_factory, speech):
    """``--message-ms 20`` (a phone call's cadence): the client sends 20 ms a message, at real time, and still gets
    its finals; a length of 0 is refused with the option's name."""
    d = await daemon_factory()
    pcm = pcm16(speech[: 16000 * 2])
    res = await loadtest.one_client(f"ws://127.0.0.1:{d.port}/v1/stream", pcm, 0.0, None, chunk_s=0.02)
    ends = [end for end, _ in res.sent]
    assert len(ends) == 100 and np.allclose(np.diff(ends), 0.02) and ends[-1] == pytest.approx(2.0)
    walls = [wall for _, wall in res.sent]
    assert walls[-1] - walls[0] >= 1.9  # at real time, not all at once
    assert res.ok and res.words >= 4  # "turn on the kitchen lights"
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--message-ms", "0"])


async def test_a_running_daemon_named_by_its_pid_gets_its_cpu_figures(daemon_factory):
    """``--url`` with ``--daemon-pid``: the level's row has the daemon's CPU per audio second, its event loop's and
    its engine thread's apart (here the daemon runs in this test's process), where without the pid it has none."""
    import asyncio

    d = await daemon_factory()
    cmd = [sys.executable, str(ROOT / "clients" / "loadtest.py"), "--url", f"ws://127.0.0.1:{d.port}/v1/stream",
           "--daemon-pid", str(os.getpid()), "--clients", "2", "--seconds", "3", "--cycles", "0"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert proc.returncode == 0, out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["daemon", "2"])
    cpu, loop, engine = map(float, row[12:15])
    assert cpu > 0 and loop > 0 and engine > 0 and loop + engine <= cpu, row


async def test_a_connection_cut_mid_stream_fails_its_client_not_the_run(speech):
    """An overloaded daemon may drop a client (its keepalive times out): that client's stream failed, with why,
    and the level's other figures are still read (the whole run used to end with the exception)."""
    from websockets.asyncio.server import serve

    async def cut(ws):
        await ws.send('{"type": "ready"}')
        await ws.recv()  # the first audio, then the connection is gone without a close frame
        ws.transport.abort()

    async with serve(cut, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        res = await loadtest.one_client(f"ws://127.0.0.1:{port}", pcm16(speech[:16000]), 0.0)
    assert not res.ok and "no close frame" in res.closed
    lv = loadtest.level_figures(1, [res], [0.001], 0.0)
    assert lv["failed"] == 1 and "failed" in loadtest.servers_row(lv)


def test_compare_takes_several_settings_for_one_daemon():
    args = loadtest.parse_args(["--set", "a.b=1", "--compare", "decoder.words='';decoder.lm=''",
                                "--compare", "endpoint.vad=false"])
    assert loadtest.compared(args) == [("words='' lm=''", ["a.b=1", "decoder.words=''", "decoder.lm=''"]),
                                       ("vad=false", ["a.b=1", "endpoint.vad=false"])]


@pytest.mark.skipif(not os.environ.get("STREAMER_TRITON_PYTHON"),
                    reason="needs a python with streamer[triton-server] in STREAMER_TRITON_PYTHON (.ci/run makes one)")
def test_loadtest_starts_a_memo_model_server_and_sends_the_daemons_windows_to_it(tmp_path):
    """--model-server: the daemon's windows go to a model server the load test started (its memo says how many it
    ran and answered), and the level's figures come back as without it."""
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "loadtest.py"), "--model", "demo", "--model-server",
         os.environ["STREAMER_TRITON_PYTHON"], "--clients", "2", "--seconds", "3", "--cycles", "0", "--json",
         str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    memo = re.search(r"the memo answered (\d+) windows and ran (\d+)", run.stdout)
    assert memo is not None, run.stdout[-2000:]
    answered, ran = int(memo[1]), int(memo[2])
    assert ran > 0 and answered > 0  # the second stream's windows were the first's: answered from memory
    [level] = json.loads(out.read_text())["levels"]
    assert level["ok"] and level["words"] >= 2 * 3  # both streams' finals: the model's real outputs
