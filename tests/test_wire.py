"""The encoder on the wire: float32 by default, float16/bfloat16 at half the bytes, decoded to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BASE_CONFIG, TINY
from fedhubert.config import load_config
from fedhubert.federation.task import (build_model, decode_arrays, encode_arrays, is_head_param, payload_bytes,
                                       split_state)


@pytest.fixture(scope="module")
def encoder() -> dict[str, torch.Tensor]:
    encoder, head = split_state(build_model(load_config(BASE_CONFIG, TINY)))
    assert head and all(is_head_param(k) for k in head) and not any(is_head_param(k) for k in encoder)
    return encoder


def test_float32_is_exact_and_full_size(encoder):
    record = encode_arrays(encoder, "float32")
    assert payload_bytes(record) == sum(t.numel() * 4 for t in encoder.values())
    for name, tensor in decode_arrays(record).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, encoder[name])


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_half_precision_halves_the_bytes_and_decodes_to_float32(encoder, wire):
    record = encode_arrays(encoder, wire)
    assert payload_bytes(record) * 2 == payload_bytes(encode_arrays(encoder, "float32"))
    expected_dtype = np.uint16 if wire == "bfloat16" else np.float16  # numpy has no bfloat16
    assert {a.numpy().dtype for a in record.values()} == {np.dtype(expected_dtype)}
    for name, tensor in decode_arrays(record).items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, encoder[name].to(getattr(torch, wire)).float(), rtol=0, atol=0)
