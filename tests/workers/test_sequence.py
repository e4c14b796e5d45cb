"""Sequence helpers (pure Python)."""

from workers.sampling import SamplingParams
from workers.sequence import Sequence


def test_token_slice_equals_slicing_token_ids():
    seq = Sequence("s", [1, 2, 3, 4], SamplingParams(), arrival=0, output_token_ids=[5, 6, 7])
    n = seq.num_tokens
    for start in range(n + 1):
        for stop in range(start, n + 2):
            assert seq.token_slice(start, stop) == seq.token_ids[start:stop]
