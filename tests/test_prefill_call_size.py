"""Contract v2 on a real model: the prefill call size is a speed knob only.

Under contract v1 a prefill call had one local window, so calls of 4096 queries took the
shipped needle model (trained at 512 tokens) past its trained length and it answered wrong
where calls of 128 answered right. Now every query block is a call of its own.
"""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from reattention import needle  # noqa: E402

from conftest import require  # noqa: E402


@pytest.mark.parametrize("method", ["reattention-bound"])
def test_needle_at_16x_answers_alike_with_prefill_calls_of_4096_and_128(method):
    require("cpu", torch.empty(1))
    model, _ = needle.load_model()
    prompts = [needle.make_sample(16 * 512, depth, seed=7)[0] for depth in (0.3, 0.7)]
    ids = torch.stack(prompts)
    with warnings.catch_warnings():
        # No scope warning may fire: a block's reach is 336 < 512 whatever the call size.
        warnings.filterwarnings("error", message="reattention: positions reach")
        with needle.use_method(model, method, backend="cpu"):
            small = needle.answer(model, method, ids, chunk_size=128)
            large = needle.answer(model, method, ids, chunk_size=4096)
    assert torch.equal(small, large)
    want = torch.stack([needle.make_sample(16 * 512, depth, seed=7)[1] for depth in (0.3, 0.7)])
    assert torch.equal(large, want), "the shipped model must find the needle at 16x"
