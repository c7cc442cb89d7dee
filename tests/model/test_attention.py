"""Attention variants: RoPE, grouped/multi-query KV heads, the SDPA path against the einsum reference,
and KV-cache decoding against full recomputation."""
import itertools

import pytest
import torch
import torch.nn as nn
from helpers import small_config

from model import GPT, generate
from model.attention import Attention, Rotary
from model.sampling import pick_next

VARIANTS = list(itertools.product([None, 2, 1], ["learned", "rope"]))  # MHA/GQA/MQA x positions


def _cfg(**kw):
    return small_config(block_size=24, **kw)   # longer than a prompt plus what is generated from it


def _pair(**kw):
    """An einsum model and an SDPA model with the same weights."""
    torch.manual_seed(0)
    ref = GPT(_cfg(attn="einsum", **kw))
    fast = GPT(_cfg(attn="sdpa", **kw))
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_rope_scores_depend_only_on_relative_position():
    rot = Rotary(head_dim=16)
    q, k = torch.randn(10, 16), torch.randn(10, 16)
    base = rot(q, 0) @ rot(k, 0).T
    for shift in (1, 7, 40):
        shifted = rot(q, shift) @ rot(k, shift).T
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rot(q, 0) @ rot(k, 3).T, base, atol=1e-3)  # relative offsets do matter


def test_multi_head_layout_equals_torch_multihead_attention():
    cfg = _cfg(n_kv_head=4)
    torch.manual_seed(0)
    ours = Attention(cfg, layer=0).eval()
    ref = nn.MultiheadAttention(cfg.d_model, cfg.n_head, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))  # q rows, then k, then v
        ref.out_proj.weight.copy_(ours.out.weight)
    x = torch.randn(3, 10, cfg.d_model)
    mask = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = not allowed
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_kv_cache_of_multi_query_is_n_head_times_smaller():
    mha, mqa = GPT(_cfg(n_head=4)), GPT(_cfg(n_head=4, n_kv_head=1))
    assert mha.new_cache(1).bytes_per_token() == 4 * mqa.new_cache(1).bytes_per_token()
    assert mha.new_cache(1).bytes_per_token() == 2 * 2 * 32 * 4  # k and v, 2 layers, width 32, fp32


@pytest.mark.parametrize("n_kv_head, pos_emb", VARIANTS)
def test_sdpa_matches_einsum_outputs_and_gradients(n_kv_head, pos_emb):
    ref, fast = _pair(n_kv_head=n_kv_head, pos_emb=pos_emb)
    idx = torch.randint(0, 50, (3, 24))
    targets = torch.randint(0, 50, (3, 24))
    logits_ref, loss_ref = ref(idx, targets)
    logits_fast, loss_fast = fast(idx, targets)
    torch.testing.assert_close(logits_fast, logits_ref, rtol=1e-5, atol=1e-5)
    loss_ref.backward()
    loss_fast.backward()
    grads_fast = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads_fast[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


EVERY_PATH = pytest.mark.parametrize("attn, n_kv_head, pos_emb", [(a, *v) for a in ("einsum", "sdpa")
                                                                    for v in VARIANTS])


def _eval_model(attn, n_kv_head, pos_emb, seed=0):
    torch.manual_seed(seed)
    return GPT(_cfg(attn=attn, n_kv_head=n_kv_head, pos_emb=pos_emb)).eval()


@EVERY_PATH
def test_cached_decoding_gives_the_logits_of_full_recomputation(attn, n_kv_head, pos_emb):
    model = _eval_model(attn, n_kv_head, pos_emb)
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)
    cache = model.new_cache(2)
    steps = [model(idx[:, :8], cache=cache)]  # prefill
    steps.append(model(idx[:, 8:11], cache=cache))  # a chunk
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(11, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@EVERY_PATH
def test_greedy_text_is_identical_with_and_without_the_cache(attn, n_kv_head, pos_emb):
    model = _eval_model(attn, n_kv_head, pos_emb, seed=1)
    prompt = torch.randint(0, 50, (2, 4))
    cached = generate(model, prompt, 20, temperature=0, use_cache=True)  # fills all 24 positions
    plain = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    longer = generate(model, prompt, 60, temperature=0)  # past block_size: the cache is refilled
    assert longer.shape == (2, 64) and torch.equal(longer[:, :24], cached)


def test_top_k_and_top_p_restrict_the_choices():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {pick_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # probabilities ~ [0.70, 0.26, 0.01, ...]: top_p 0.5 keeps only the first, 0.9 the first two
    assert {pick_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {0}
    assert {pick_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)} == {0, 1}
    assert pick_next(logits, 0.0).item() == 0
