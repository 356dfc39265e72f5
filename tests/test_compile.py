"""torch.compile(fullgraph=True) through fusedce: no graph break, the same values and gradients."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import make_logits, make_targets, rel_err


def _loss(x, t, w, impl, inplace=False):
    loss, stats = fusedce.cross_entropy(x, t, w, label_smoothing=0.1, softcap=20.0,
                                        lse_square_scale=1e-4, impl=impl, return_stats=True,
                                        inplace_backward=inplace)
    return loss, stats.accuracy


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("inplace", [False, True])
def test_fullgraph_matches_eager(impl, inplace, device):
    hidden = make_logits(12, 300, torch.float32, device).requires_grad_()
    target = make_targets(12, 300, device, ignore_fraction=0.2)
    weight = torch.rand(300, device=device)

    def step(h):
        loss, accuracy = _loss(h * 1.0, target, weight, impl, inplace)
        return loss, accuracy

    compiled = torch.compile(step, fullgraph=True)
    loss_c, acc_c = compiled(hidden)
    loss_c.backward()
    grad_c = hidden.grad.clone()
    hidden.grad = None
    loss_e, acc_e = step(hidden)
    loss_e.backward()
    assert rel_err(loss_c, loss_e) <= 1e-6
    assert rel_err(grad_c, hidden.grad) <= 1e-6
    assert acc_c.item() == acc_e.item()


def test_reduction_none_and_num_items_compile(impl, device):
    logits = make_logits(8, 200, torch.bfloat16, device).requires_grad_()
    target = make_targets(8, 200, device, ignore_fraction=0.3)
    n_items = torch.tensor(5, device=device)

    def step(x):
        per_token = fusedce.cross_entropy(x, target, reduction="none", impl=impl)
        accumulated = fusedce.cross_entropy(x, target, impl=impl, num_items_in_batch=n_items)
        return (per_token * torch.linspace(0, 1, 8, device=device)).sum() + accumulated

    out_c = torch.compile(step, fullgraph=True)(logits)
    out_c.backward()
    grad_c = logits.grad.clone()
    logits.grad = None
    out_e = step(logits)
    out_e.backward()
    assert rel_err(out_c, out_e) <= 1e-2
    assert rel_err(grad_c, logits.grad) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_reduce_overhead():
    hidden = make_logits(64, 32000, torch.bfloat16, "cuda").requires_grad_()
    target = make_targets(64, 32000, "cuda", ignore_fraction=0.1)

    def step(h):
        return fusedce.cross_entropy(h * 1.0, target)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the graph is recorded, then replayed
        hidden.grad = None
        loss = compiled(hidden)
        loss.backward()
    grad_c = hidden.grad.clone()
    hidden.grad = None
    step(hidden).backward()
    assert rel_err(grad_c, hidden.grad) <= 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_tiny_llama_train_step_compiles(fused_linear):
    """A transformers causal LM with fusedce applied (logits, or fused linear from the hidden
    states) compiles with fullgraph=True and matches stock transformers' loss and gradients."""
    transformers = pytest.importorskip("transformers")
    from fusedce.integrations import transformers as fce_hf

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(stock.state_dict())
    fce_hf.apply(model, fused_linear=fused_linear)
    input_ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(input_ids)
    mask[1, 8:] = 0
    labels = fce_hf.build_labels(input_ids, mask)

    def step(m):
        return m(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    loss = torch.compile(step, fullgraph=True)(model)
    loss.backward()  # through the compiled backward graph
    ref = step(stock)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5
    for (name, p), p_ref in zip(model.named_parameters(), stock.parameters()):
        assert rel_err(p.grad, p_ref.grad) <= 1e-4, name
