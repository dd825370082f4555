import pytest
import torch
from conftest import tiny_model_config

from minipretrain.generate import generate, sample_next
from minipretrain.model import KVCache, MiniMind


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MiniMind(tiny_model_config()).eval()


def test_logits_shape_and_loss(model):
    ids = torch.randint(0, 320, (3, 17))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 17, 320)
    # an untrained model is close to uniform over the vocabulary
    assert abs(out.loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5


def test_loss_ignores_minus_100_and_matches_manual_shift(model):
    ids = torch.randint(0, 320, (2, 12))
    labels = ids.clone()
    labels[:, 8:] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :7].reshape(-1, 320), ids[:, 1:8].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    all_ignored = model(ids, labels=torch.full_like(ids, -100)).loss
    assert all_ignored.item() == 0.0


def test_causality_future_tokens_never_change_earlier_logits(model):
    ids = torch.randint(0, 320, (1, 20))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 320
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_and_rope_shapes():
    cfg = tiny_model_config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    m = MiniMind(cfg)
    attn = m.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (2 * 8, 64)  # kv heads * head dim
    assert attn.v_proj.weight.shape == (16, 64)
    assert m.rope_cos.shape == (cfg.max_position_embeddings, cfg.head_dim)
    # rotary embedding keeps vector norms (it is a rotation)
    from minipretrain.model import apply_rope
    x = torch.randn(1, 2, 10, cfg.head_dim)
    y = apply_rope(x, m.rope_cos[:10], m.rope_sin[:10])
    torch.testing.assert_close(x.norm(dim=-1), y.norm(dim=-1))


def test_rope_scores_depend_only_on_relative_position():
    from minipretrain.model import apply_rope, rope_tables
    cos, sin = rope_tables(16, 64, 1e6)
    q, k = torch.randn(16), torch.randn(16)
    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 16), cos[i], sin[i])
        kj = apply_rope(k.view(1, 1, 1, 16), cos[j], sin[j])
        return (qi * kj).sum()
    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_no_biases(model):
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_parameter_count_26m_preset():
    from minipretrain.config import load_config
    cfg = load_config("configs/minimind2-26m.toml")
    with torch.device("meta"):
        n = MiniMind(cfg.model).num_parameters()
    assert 25e6 < n < 27e6


def test_qk_norm_option_adds_per_head_norms():
    m = MiniMind(tiny_model_config(qk_norm=True))
    assert m.layers[0].self_attn.q_norm.weight.shape == (8,)
    ids = torch.randint(0, 320, (1, 9))
    assert torch.isfinite(m(ids, labels=ids).loss)


def test_kv_cache_logits_match_full_forward(model):
    ids = torch.randint(0, 320, (1, 15))
    full = model(ids).logits
    cache = KVCache()
    first = model(ids[:, :6], cache=cache).logits
    chunk = model(ids[:, 6:10], cache=cache).logits  # several new tokens after history
    rest = torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(10, 15)], dim=1)
    torch.testing.assert_close(torch.cat([first, chunk, rest], dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, 20, 0.9), (0.7, None, 0.5)])
def test_cached_and_uncached_generation_give_the_same_tokens(model, temperature, top_k, top_p):
    prompt = [5, 17, 99, 3]
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(generate(model, prompt, 25, temperature, top_k, top_p, eos_id=None, use_cache=use_cache,
                             generator=g))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 25


def test_generation_stops_at_eos_and_respects_max_positions(model):
    eos = generate(model, [1, 2, 3], 10, temperature=0.0)[0]  # the greedy first token, used as "eos"
    assert generate(model, [1, 2, 3], 10, temperature=0.0, eos_id=eos) == []
    long = generate(model, list(range(120)), 50, temperature=0.0)
    assert len(long) == 128 - 120


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 2, None, g).item() for _ in range(200)}
    assert picks == {0, 1}
    # top-p 0.5: the first token alone holds ~66% of the mass
    picks = {sample_next(logits, 1.0, None, 0.5, g).item() for _ in range(100)}
    assert picks == {0}


def test_evaluate_bits_per_byte_counts_the_bytes_of_predicted_tokens(tmp_path):
    import json
    import math

    from minipretrain.data.batches import make_rows
    from minipretrain.data.shards import PreparedData, PrepareOptions, prepare
    from minipretrain.evaluate import evaluate, token_byte_lengths
    from minipretrain.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b  # 加法 ✓\n"
    tokenizer = train_tokenizer([text * 20], 300, show_progress=False)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    prepare([str(tmp_path / "one.jsonl")], tokenizer, tmp_path / "prepared", PrepareOptions(workers=1),
            show_progress=False)
    stream = PreparedData(tmp_path / "prepared").split("train")
    rows = make_rows(stream, "packed", 64, tokenizer, for_eval=True)  # one partial row: text + eos
    torch.manual_seed(0)
    model = MiniMind(tiny_model_config())
    result = evaluate(model, rows, 4, token_byte_lengths(tokenizer, 320))
    ids = tokenizer.encode(text)
    first_token_bytes = len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert result["bytes"] == len(text.encode("utf-8")) - first_token_bytes  # eos spells no bytes
    assert result["tokens"] == len(ids)  # every token after the first, plus the eos
    inputs, labels, _ = rows.get([0])
    assert result["loss"] == pytest.approx(model(inputs, labels=labels).loss.item(), rel=1e-5)
    assert result["bits_per_byte"] < result["loss"] * result["tokens"] / math.log(2) / result["bytes"]


# --- document masking (doc_ids) ---

def _packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (sum(lengths),), generator=g)
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])
    return ids, doc_ids


def _spans(lengths):
    start = 0
    for n in lengths:
        yield start, start + n
        start += n


def test_document_runs_positions_restart_at_each_document():
    from minipretrain.model import document_runs
    run, pos = document_runs(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [7, 3, 3, 3, 3, 3, 7, 7]]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 1]]
    assert run.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3], [1, 2, 2, 2, 2, 2, 3, 3]]  # a reused id is a new document


def test_forward_rotates_by_the_position_within_each_document(model):
    # Logits cannot show this (RoPE scores depend only on relative positions), so look at what attention gets.
    seen = {}
    model.layers[0].self_attn.register_forward_pre_hook(lambda module, args: seen.update(cos=args[1]))
    ids, doc_ids = _packed([5, 9, 4])
    model(ids[None], doc_ids=doc_ids[None])
    positions = torch.cat([torch.arange(5), torch.arange(9), torch.arange(4)])
    torch.testing.assert_close(seen["cos"], model.rope_cos[positions][None, None])


FLEX_EAGER_WARNING = "ignore:flex_attention called without torch.compile"


@pytest.mark.filterwarnings(FLEX_EAGER_WARNING)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_documents_give_the_logits_of_each_document_alone(model, backend):
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    model.attn_backend = backend
    rows = [[5, 9, 4], [11, 2, 3, 2]]  # two rows with different boundaries, 18 tokens each
    packed = [_packed(lengths, seed=i) for i, lengths in enumerate(rows)]
    ids, doc_ids = torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])
    with torch.no_grad():  # FlexAttention on CPU has no backward
        logits = model(ids, doc_ids=doc_ids).logits
        for row, lengths in enumerate(rows):
            for a, b in _spans(lengths):
                alone = model(ids[row : row + 1, a:b]).logits[0]
                torch.testing.assert_close(logits[row, a:b], alone, atol=1e-5, rtol=1e-4)
        # and without doc_ids the later documents do see the earlier ones
        assert not torch.allclose(model(ids).logits[0, 5:14], logits[0, 5:14], atol=1e-3)


@pytest.mark.filterwarnings(FLEX_EAGER_WARNING)
def test_flex_and_sdpa_backends_give_the_same_logits_on_cpu(model):
    pytest.importorskip("torch.nn.attention.flex_attention")
    ids, doc_ids = _packed([40, 3, 1, 60, 24])  # 128 tokens: several flex blocks' worth of boundaries
    ids, doc_ids = torch.stack([ids, ids.flip(0)]), torch.stack([doc_ids, doc_ids.flip(0)])
    with torch.no_grad():
        model.attn_backend = "sdpa"
        sdpa = model(ids, doc_ids=doc_ids).logits
        model.attn_backend = "flex"
        flex = model(ids, doc_ids=doc_ids).logits
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-4)


def test_document_mask_is_causal_within_each_document_only():
    from minipretrain.model import dense_document_mask, document_mask_mod, document_runs
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 5, 5]])
    run, _ = document_runs(doc_ids)
    dense = dense_document_mask(run)
    expected = torch.tensor([[[(k <= q and doc_ids[b, q] == doc_ids[b, k]) for k in range(8)] for q in range(8)]
                             for b in range(2)]).unsqueeze(1)
    assert torch.equal(dense, expected)
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    # the same mask_mod evaluated the way create_block_mask does it (vmap over indices)
    assert torch.equal(flex_attention.create_mask(document_mask_mod(run), 2, 1, 8, 8, device="cpu"), expected)


def test_attention_backend_selection(monkeypatch):
    import minipretrain.model as model_module
    assert model_module.attention_backend("cpu", 64) == "sdpa"
    assert model_module.attention_backend("cuda", 64) == ("flex" if model_module.flex_attention else "sdpa")
    assert model_module.attention_backend("cuda", 8) == "sdpa"  # flex's GPU kernels need heads >= 16 wide
    assert MiniMind(tiny_model_config()).attention_backend_for("cuda") == "sdpa"  # head_dim 8
    monkeypatch.setattr(model_module, "flex_attention", None)
    assert model_module.attention_backend("cuda", 64) == "sdpa"
    m = MiniMind(tiny_model_config(dropout=0.1))
    m.attn_backend = "flex"
    assert m.eval().attention_backend_for("cpu") == "flex"
    assert m.train().attention_backend_for("cpu") == "sdpa"  # FlexAttention has no dropout


def test_one_document_equals_no_doc_ids(model):
    ids = torch.randint(0, 320, (2, 21))
    torch.testing.assert_close(model(ids, doc_ids=torch.full_like(ids, 3)).logits, model(ids).logits,
                               atol=1e-5, rtol=1e-4)


def test_packed_loss_sums_the_per_document_losses(model):
    lengths = [5, 9, 4]
    ids, doc_ids = _packed(lengths)
    labels = ids.clone()
    for a, _ in _spans(lengths):
        labels[a] = -100  # the target at a document start would be predicted across the boundary
    out = model(ids[None], labels=labels[None], doc_ids=doc_ids[None])
    packed_sum = out.loss * (labels[1:] != -100).sum()
    alone_sum = sum(model(ids[None, a:b], labels=ids[None, a:b]).loss * (b - a - 1) for a, b in _spans(lengths))
    torch.testing.assert_close(packed_sum, alone_sum, atol=1e-4, rtol=1e-5)


def test_doc_ids_backward_and_cache_is_rejected():
    torch.manual_seed(0)
    m = MiniMind(tiny_model_config(dropout=0.1)).train()
    m.attn_backend = "flex"  # falls back to SDPA while dropout is active, so the CPU backward works
    ids, doc_ids = _packed([6, 10])
    m(ids[None], labels=ids[None], doc_ids=doc_ids[None]).loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cache"):
        m.eval()(ids[None], cache=KVCache(), doc_ids=doc_ids[None])
