import math

import pytest
import torch
from helpers import small_model

from model import GPT, GPTConfig, generate


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_causality_changing_token_t_changes_no_earlier_logits(n_kv_head):
    model = small_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 70, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 70
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_wrong_input_shapes_fail_with_a_clear_message():
    model = small_model()
    with pytest.raises(ValueError, match=r"shape \(batch, time\), got shape \(16,\)"):
        model(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds model.block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 or int32 token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_loss_at_init_is_near_ln_vocab():
    model = small_model(vocab_size=70)
    idx = torch.randint(0, 70, (8, 16))
    _, loss = model(idx, torch.randint(0, 70, (8, 16)))
    assert abs(loss.item() - math.log(70)) < 0.1


def test_weights_are_tied_and_residual_projections_scaled():
    model = small_model(n_layer=4)
    assert model.head.weight is model.tok_emb.weight
    std = model.blocks[0].attn.out.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.002


@pytest.mark.parametrize("kw, keys", [
    (dict(d_model=30, n_head=4), "model.d_model=30 is not divisible by model.n_head=4"),
    (dict(n_head=4, n_kv_head=3), "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (dict(pos_emb="alibi"), "model.pos_emb"),
    (dict(pos_emb="rope", d_model=36, n_head=4), "model.pos_emb=rope needs an even head dim, but model.d_model=36"),
    (dict(attn="flash"), "model.attn"),
])
def test_bad_config_names_the_keys(kw, keys):
    with pytest.raises(ValueError, match=keys.replace(".", r"\.")):
        small_model(**kw)


def test_grouped_query_attention_with_one_group_per_head_is_multi_head():
    """n_kv_head = n_head is the standard layout: each query head has its own key/value head."""
    mha, gqa = small_model(n_kv_head=None), small_model(n_kv_head=4)
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 70, (2, 16))
    assert torch.equal(mha(idx), gqa(idx))
    assert small_model(n_kv_head=1).blocks[0].attn.kv.weight.shape == (2 * 8, 32)


def test_generate_extends_the_prompt_and_is_reproducible():
    model = small_model()
    prompt = torch.randint(0, 70, (1, 5))
    out = generate(model, prompt, 30, temperature=0)
    assert out.shape == (1, 35) and torch.equal(out[:, :5], prompt)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = generate(model, prompt, 20, 1.0, 5, generator=g1)
    assert torch.equal(first, generate(model, prompt, 20, 1.0, 5, generator=g2))


@pytest.mark.parametrize("preset", ["tiny", "baby", "base", "gpt3_small"])
def test_preset_parameter_count_matches_12_L_d2_plus_embeddings(preset):
    import yaml
    from helpers import ROOT

    values = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text()) or {}  # baby: the defaults
    cfg = GPTConfig(vocab_size=70, **values)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params(non_embedding=False) == pytest.approx(cfg.approx_params(), rel=0.01)
    if preset == "gpt3_small":
        assert 84e6 < model.num_params() < 86e6  # GPT-3 Small's ~85M non-embedding parameters


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=70, n_layer=3, n_head=2, d_model=32, block_size=16, dropout=0.1))
    recomputed = GPT(GPTConfig(vocab_size=70, n_layer=3, n_head=2, d_model=32, block_size=16, dropout=0.1))
    recomputed.load_state_dict(plain.state_dict())
    recomputed.activation_checkpointing = True
    idx = torch.randint(0, 70, (4, 16))
    losses = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # same dropout masks; recomputation replays them
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
