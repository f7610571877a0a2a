"""The adapter cache: a second job with the same prompt and hypernet loads; a changed hypernet never does."""

import pytest
import torch

from talora.model.files import AdapterCache


def _model(tiny_config, text_encoder, seed):
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    model = build_task_aware_sam(tiny_config, text_encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a hypernet whose adapters are not zero and differ per prompt
        for head in model.hypernet.heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
    return model.eval()


def test_a_second_model_with_the_same_hypernet_loads_and_a_changed_one_generates(tiny_config, text_encoder, tmp_path):
    prompts = ["segment vehicles", "segment fruit"]
    cache = AdapterCache(str(tmp_path / "adapters"))
    with torch.no_grad():
        first = _model(tiny_config, text_encoder, seed=1)
        assert cache.fill(first, prompts) == {p: "generated" for p in prompts}
        assert len(list((tmp_path / "adapters").iterdir())) == 2

        again = _model(tiny_config, text_encoder, seed=1)  # the same weights: the same digest
        again.hypernet.forward = lambda *a, **k: pytest.fail("a cached adapter was generated again")
        assert cache.fill(again, prompts) == {p: "loaded" for p in prompts}
        for name, (a, b) in first.adapters(prompts).weights.items():
            a2, b2 = again.adapters(prompts).weights[name]
            assert torch.equal(a, a2) and torch.equal(b, b2)

        changed = _model(tiny_config, text_encoder, seed=2)  # another hypernet: never the stale adapter
        assert changed.hypernet.digest() != first.hypernet.digest()
        assert cache.fill(changed, prompts) == {p: "generated" for p in prompts}
        name = next(iter(first.adapters(prompts).weights))
        assert not torch.equal(changed.adapters(prompts).weights[name][1], first.adapters(prompts).weights[name][1])
        assert len(list((tmp_path / "adapters").iterdir())) == 4


def test_a_cache_file_holding_another_prompt_is_refused(tiny_config, text_encoder, tmp_path):
    import shutil

    cache = AdapterCache(str(tmp_path))
    with torch.no_grad():
        model = _model(tiny_config, text_encoder, seed=1)
        cache.fill(model, ["segment vehicles"])
        digest = model.hypernet.digest()
        shutil.copy(cache.uri_of(digest, "segment vehicles"), cache.uri_of(digest, "segment fruit"))
        with pytest.raises(ValueError, match="holds 'segment vehicles'"):
            cache.load(model, "segment fruit")
