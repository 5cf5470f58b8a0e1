"""Names the Python side gives to the header's constants match the header."""
from __future__ import annotations

from lbcore._layout import lib
from lbcore.balance import ALGORITHMS
from lbcore.config import RELAY_MODES


def test_algorithm_numbers_match_the_header():
    assert ALGORITHMS == {"wrr": lib.FLC_ALGO_WRR, "least_conn": lib.FLC_ALGO_LEAST_CONN,
                          "p2c": lib.FLC_ALGO_P2C, "maglev": lib.FLC_ALGO_MAGLEV}


def test_relay_modes_match_the_header():
    assert RELAY_MODES == {"auto": lib.FLC_RELAY_AUTO, "splice": lib.FLC_RELAY_SPLICE,
                           "copy": lib.FLC_RELAY_COPY}
