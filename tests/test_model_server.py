"""The model server's memo of windows (``streamer model-server --memo``), on the demo model."""

from __future__ import annotations

import numpy as np

from streamer.aio.processes.model_server import WindowMemo


class Counted:
    """The demo model's ``run``, with the windows it was asked to run."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.asked: list[int] = []

    def __call__(self, windows):
        self.asked.append(len(windows))
        return self.runner.run(windows)


def test_windows_seen_before_are_answered_from_memory_with_the_models_outputs(model_runner, speech):
    a, b, c = speech[:16000], speech[16000:32000], speech[32000:40000]
    model = Counted(model_runner)
    memo = WindowMemo(model, size=2)
    first = memo([a, b, a.copy()])
    assert model.asked == [2]  # a and b once; the copy of a is the same bytes
    for got, want in zip(first, model_runner.run([a, b, a]), strict=True):
        np.testing.assert_array_equal(got, want)
    again = memo([b, a])
    assert model.asked == [2]  # nothing new ran
    np.testing.assert_array_equal(again[0], first[1])
    memo([c])  # a third window: the least recently used one (b) goes
    assert model.asked == [2, 1]
    memo([a])
    assert model.asked == [2, 1]
    memo([b])
    assert model.asked == [2, 1, 1]
    assert (memo.hits, memo.misses) == (4, 4)


def test_the_same_bytes_in_another_dtype_or_length_are_another_window(model_runner):
    model = Counted(model_runner)
    memo = WindowMemo(lambda ws: model([np.asarray(w, np.float32) for w in ws]), size=8)
    samples = np.zeros(8000, np.int16)
    memo([samples, np.zeros(4000, np.float32)])  # the same 16000 zero bytes
    assert model.asked == [2]
    memo([samples[:4000], np.zeros(4000, np.int16)])  # half of them: another window, then the same one
    assert model.asked == [2, 1]
