"""Packed-row attention (tasks/runtime/attention.py): a packed row must train exactly like its rows apart."""

import pytest
import torch

from tasks.runtime.attention import ATTENTION, register

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(attn: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    register()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def _packed(rows):
    ids = torch.cat(rows)[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    cu = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
    return ids, pos, cu


def test_packed_row_matches_rows_apart_in_logits_and_gradients(monkeypatch):
    torch.manual_seed(1)
    rows = [torch.randint(0, 300, (n,)) for n in (7, 19, 1, 12)]
    ids, pos, cu = _packed(rows)

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return sdpa(q, k, v, *args, **kwargs)

    packed = _model(ATTENTION)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = packed(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19, max_length_k=19)
    monkeypatch.undo()
    # each row's own causal triangle, no mask over the packed row: one unmasked call per row and layer
    assert calls == [(n, True, None) for n in (7, 19, 1, 12)] * 2
    out.logits.float().pow(2).mean().backward()

    apart = _model("sdpa")
    apart.load_state_dict(packed.state_dict())
    logits = torch.cat([apart(input_ids=r[None]).logits for r in rows], dim=1)
    logits.float().pow(2).mean().backward()

    assert torch.allclose(out.logits, logits, atol=1e-5), (out.logits - logits).abs().max()
    for (name, a), b in zip(packed.named_parameters(), apart.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_packed_row_differs_from_attention_across_rows():
    """The same tokens without boundaries (one long row) give other logits: the boundaries are used."""
    torch.manual_seed(2)
    rows = [torch.randint(0, 300, (n,)) for n in (9, 9)]
    ids, pos, cu = _packed(rows)
    model = _model(ATTENTION)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
        joined = model(input_ids=ids).logits  # no cu_seq_lens: plain causal SDPA over the whole row
    assert torch.allclose(packed[:, :9], joined[:, :9], atol=1e-5)
    assert not torch.allclose(packed[:, 9:], joined[:, 9:], atol=1e-3)


def test_unpacked_batches_fall_back_to_sdpa_with_padding_mask():
    torch.manual_seed(3)
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    ours, ref = _model(ATTENTION), _model("sdpa")
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :6], b[1, :6], atol=1e-5)


def test_boundaries_that_do_not_cover_the_row_are_an_error():
    ids, pos, _ = _packed([torch.randint(0, 300, (8,)), torch.randint(0, 300, (4,))])
    bad = torch.tensor([0, 8, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q ends at 10 but the packed row holds 12 tokens"):
        _model(ATTENTION)(input_ids=ids, position_ids=pos, cu_seq_lens_q=bad, cu_seq_lens_k=bad)


def test_backend_setting_is_checked_and_cpu_uses_the_loop(monkeypatch):
    from tasks.runtime.attention import BACKEND_ENV, backend

    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="TUNELINE_PACKED_ATTENTION='fast'"):
        backend()
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert backend("cpu") == "loop"  # varlen kernels are CUDA only
    monkeypatch.setenv(BACKEND_ENV, "loop")
    assert backend("cuda") == "loop"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen attention runs on CUDA only")
def test_varlen_kernel_matches_the_per_row_loop_on_cuda(monkeypatch):
    """One varlen launch per layer gives the loop's logits and gradients (bf16, GQA heads)."""
    from tasks.runtime.attention import BACKEND_ENV, backend

    torch.manual_seed(4)
    rows = [torch.randint(0, 300, (n,)) for n in (70, 190, 1, 120)]
    ids, pos, cu = _packed(rows)
    ids, pos, cu = ids.cuda(), pos.cuda(), cu.cuda()
    results = {}
    for kind in ("loop", "varlen"):
        monkeypatch.setenv(BACKEND_ENV, kind)
        assert backend() == kind
        model = _model(ATTENTION).cuda().to(torch.bfloat16)
        out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=190)
        out.logits.float().pow(2).mean().backward()
        results[kind] = (out.logits.float(), [p.grad.float() for p in model.parameters()])
    (a, ga), (b, gb) = results["loop"], results["varlen"]
    assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=2e-2, rtol=5e-2), (x - y).abs().max()
