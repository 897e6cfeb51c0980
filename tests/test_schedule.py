"""The layer schedule: the order every worker walks, and the empty-step lockstep (no torch needed)."""
from __future__ import annotations

import pytest

from afdserve.engine.schedule import layer_order, run_idle_layers, run_layers


class _Layer:
    def __init__(self, i: int):
        self.i = i

    def ffn_input(self, h):
        return ("ffn_input", self.i, h)


class _RecordingFFN:
    """An FFN backend that logs every call; the FFN of layer i adds 10**i."""

    def __init__(self):
        self.log, self._pending = [], {}

    def begin_step(self, m):
        self.log.append(("begin", m))

    def submit(self, layer, mb, inp):
        self.log.append(("submit", layer, mb))
        self._pending[(layer, mb)] = 10 ** layer

    def collect(self, layer, mb):
        self.log.append(("collect", layer, mb))
        return self._pending.pop((layer, mb))

    def end_step(self):
        self.log.append(("end",))


def test_layer_order_is_layer_major():
    assert list(layer_order(2, 3)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert list(layer_order(3, 1)) == [(0, 0), (1, 0), (2, 0)]


@pytest.mark.parametrize("L,m", [(1, 1), (3, 1), (3, 2), (4, 3)])
def test_run_layers_follows_the_order_and_adds_every_ffn_output(L, m):
    ffn, attended = _RecordingFFN(), []

    def attend(i, j, h):
        attended.append((i, j))
        return h + 1

    out = run_layers([_Layer(i) for i in range(L)], [100 * j for j in range(m)], attend, ffn)
    assert attended == list(layer_order(L, m))
    expected = [("begin", m)]
    for i, j in layer_order(L, m):
        expected += ([("collect", i - 1, j)] if i else []) + [("submit", i, j)]
    expected += [("collect", L - 1, j) for j in range(m)] + [("end",)]
    assert ffn.log == expected
    # Each micro-batch: +1 per attention half, + 10**i from layer i's FFN.
    assert out == [100 * j + L + sum(10 ** i for i in range(L)) for j in range(m)]


def test_idle_step_walks_every_pair_empty():
    ffn, seen = _RecordingFFN(), []

    class Layer(_Layer):
        def ffn_input(self, h):
            seen.append(h)
            return h

    run_idle_layers([Layer(i) for i in range(3)], 0, 2, ffn)
    assert [e for e in ffn.log if e[0] == "submit"] == [("submit", i, j) for i, j in layer_order(3, 2)]
    assert len([e for e in ffn.log if e[0] == "collect"]) == 3 * 2
    assert seen[:2] == [0, 0]     # micro-batches start empty and reach the FFN untouched by attention
