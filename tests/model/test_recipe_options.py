"""The fast recipe's model options (RoPE, QK-norm, relu², an untied head): each as the math says,
and the fast paths (sdpa, the KV cache) equal to the reference einsum forward with every option on."""
from __future__ import annotations

import pytest
import torch
from helpers import RECIPE, small_config

from model import GPT
from model.attention import Rotary


def test_rope_tables_are_built_once_per_device_and_rotate_as_complex_numbers():
    rotary = Rotary(head_dim=8)
    x = torch.randn(2, 3, 10, 8)
    for start in (0, 4):
        got = rotary(x, start)
        # the same rotation as complex multiplication: (x_i + i x_{i+d/2}) * e^{i pos theta_i}
        theta = 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
        angle = torch.outer(torch.arange(start, start + 10).double(), theta)
        z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.polar(torch.ones_like(angle), angle)
        assert torch.allclose(got.double(), torch.cat([z.real, z.imag], dim=-1), atol=1e-5)
    tables = rotary.tables(14, x.device)
    rotary(x, 0)
    assert rotary.tables(14, x.device)[0] is tables[0]  # not recomputed by a call within its length


def test_rope_tables_first_made_while_sampling_in_inference_mode_still_serve_training():
    model = GPT(small_config(pos_emb="rope"))
    ids = torch.randint(0, 40, (2, 16))
    with torch.inference_mode():
        model(ids)
    _, loss = model(ids, ids)
    loss.backward()  # inference tensors cannot be saved for backward: the tables are not made as such
    assert model.blocks[0].attn.rotary.tables(16, ids.device)[0].shape[0] == 16  # block_size, made once


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_every_recipe_option_keeps_sdpa_equal_to_einsum_and_the_cache_equal_to_the_full_forward(kv):
    torch.manual_seed(0)
    reference = GPT(small_config(attn="einsum", n_kv_head=kv, **RECIPE)).eval()
    fast = GPT(small_config(attn="sdpa", n_kv_head=kv, **RECIPE)).eval()
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        full = reference(ids)
        assert (fast(ids) - full).abs().max() < 1e-5
        cache = fast.new_cache(3)
        steps = [fast(ids[:, :9], cache=cache)] + [fast(ids[:, i:i + 1], cache=cache) for i in range(9, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 16))
    for qk_norm, blind in ((True, True), (False, False)):
        model = GPT(small_config(qk_norm=qk_norm)).eval()
        with torch.no_grad():
            before = model(ids)
            for block in model.blocks:
                block.attn.q.weight.mul_(7.0)
                block.attn.kv.weight[:block.attn.n_kv * block.attn.hd].mul_(7.0)  # the keys' rows
            assert torch.allclose(model(ids), before, atol=1e-4) is blind


def test_an_untied_head_is_its_own_parameter_and_counted():
    tied, untied = GPT(small_config()), GPT(small_config(tie_head=False))
    assert tied.head.weight is tied.tok_emb.weight and untied.head.weight is not untied.tok_emb.weight
    cfg = small_config()
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == cfg.vocab_size * cfg.d_model
    assert untied.num_params() == tied.num_params()  # the head is not a hidden-layer parameter
