import pytest
import torch
import torch.nn.functional as F

from talora.config import HyperNetConfig
from talora.adapters.hypernet import TaskAwareHyperNet
from talora.core.lora import LoraTarget


def test_untrained_hypernet_emits_zero_delta_w_for_every_target(tiny_model):
    adapter = tiny_model.hypernet(torch.randn(3, 384, dtype=torch.float64))
    assert adapter.num_rows == 3 and list(adapter.weights) == [t.name for t in tiny_model.targets]
    for t in tiny_model.targets:
        a, b = adapter.weights[t.name]
        assert a.shape == (3, 4, t.in_features) and b.shape == (3, t.out_features, 4)
        assert torch.count_nonzero(b) == 0, t.name  # B = 0 => Delta W = 0
        assert a.abs().sum() > 0, t.name  # A is the standard (non-zero) LoRA init
        for i in range(3):
            assert torch.count_nonzero(adapter.row(i).delta_weight(t.name)) == 0


def _mask_loss(model, text, image, target):
    adapter = model.hypernet(text)  # (P rows)
    P = text.shape[0]
    trunk = model.embed_trunk(image)
    embeddings = model.embed_tail(trunk.expand(P, -1, -1, -1), adapter)
    out = model.decode(embeddings, adapter, multimask_output=False)
    return F.binary_cross_entropy_with_logits(out.masks, target), out.masks


def test_mask_loss_gradients_reach_the_text_projection_and_every_transformer_layer(tiny_model):
    torch.manual_seed(0)
    model = tiny_model.float().train()
    text = torch.randn(2, 384)
    image = torch.randn(1, 3, 256, 256)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    optimiser = torch.optim.Adam(model.trainable_modules().parameters(), lr=1e-3)

    loss, masks_before = _mask_loss(model, text, image, target)
    loss.backward()
    # First step: zero head weights block everything but the heads' own B part.
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.hypernet.encoder.parameters())
    optimiser.step()
    optimiser.zero_grad()

    loss, masks_after = _mask_loss(model, text, image, target)
    loss.backward()
    hypernet = model.hypernet
    assert all(torch.count_nonzero(p.grad) > 0 for p in hypernet.text_proj.parameters())
    for i, layer in enumerate(hypernet.encoder.layers):
        assert torch.count_nonzero(layer.self_attn.in_proj_weight.grad) > 0, f"layer {i} attention"
        assert torch.count_nonzero(layer.linear1.weight.grad) > 0, f"layer {i} MLP"
    assert not torch.allclose(masks_before, masks_after)  # the decoder output has changed
    assert all(p.grad is None for p in model.sam.parameters())  # the base stays frozen


def test_different_prompts_give_different_adapters_once_trained(tiny_model):
    with torch.no_grad():
        for head in tiny_model.hypernet.heads.values():
            head.weight.normal_(0, 0.01)
    adapter = tiny_model.hypernet(torch.randn(2, 384, dtype=torch.float64))
    name = tiny_model.targets[0].name
    assert not torch.allclose(adapter.row(0).delta_weight(name), adapter.row(1).delta_weight(name))


def test_targets_with_the_same_identity_are_refused():
    twins = [LoraTarget(name, 4, 4, "mask_decoder", 0, "decoder.x") for name in ("a", "b")]
    with pytest.raises(ValueError, match="depth, module type"):
        TaskAwareHyperNet(twins, HyperNetConfig(hidden_dim=8, num_heads=2), 2, 1.0)


def test_digest_changes_with_the_weights(tiny_model):
    before = tiny_model.hypernet.digest()
    assert before == tiny_model.hypernet.digest()
    with torch.no_grad():
        next(tiny_model.hypernet.parameters()).add_(1.0)
    assert tiny_model.hypernet.digest() != before


def test_tucker_hypernet_starts_at_zero_delta_and_learns_the_core(tiny_config):
    import dataclasses

    from talora.model.loading import build_task_aware_sam

    config = dataclasses.replace(tiny_config, hypernet=dataclasses.replace(tiny_config.hypernet, adapter_type="tucker"))
    torch.manual_seed(0)
    model = build_task_aware_sam(config)
    adapter = model.hypernet(torch.randn(2, 384))
    t = model.targets[0]
    a, b = adapter.weights[t.name]
    assert a.shape == (2, 4, t.in_features) and b.shape == (2, t.out_features, 4)
    assert all(torch.count_nonzero(adapter.row(i).delta_weight(n)) == 0 for i in range(2) for n in adapter.weights)
    u = model.hypernet.factors_u[0]
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-5, rtol=0)  # orthogonal init, never zero

    trunk = model.embed_trunk(torch.randn(1, 3, 256, 256))
    out = model.decode(model.embed_tail(trunk.expand(2, -1, -1, -1), adapter), adapter, multimask_output=False)
    out.masks.sum().backward()
    assert torch.count_nonzero(model.hypernet.core_head.bias.grad) > 0  # the core gets a gradient at C = 0
    lora_numbers = sum(r.numel() for r in build_task_aware_sam(tiny_config).hypernet.heads.parameters())
    assert sum(p.numel() for p in model.hypernet.core_head.parameters()) < lora_numbers / 100  # far smaller heads
