import pytest
import torch

from talora.core.text import validate_prompts


def test_embeddings_are_384_d_unit_vectors_in_prompt_order(text_encoder):
    e = text_encoder.encode(["segment vehicles", "segment all red apples"])
    assert e.shape == (2, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    assert not torch.allclose(e[0], e[1])


def test_related_prompts_are_closer_than_unrelated_ones(text_encoder):
    # A real property of all-MiniLM-L6-v2 loaded offline: it proves the weights, not random ones.
    cars, trucks, apples = text_encoder.encode(["segment the cars", "segment the trucks", "segment the apples"])
    assert cars @ trucks > cars @ apples


def test_cache_returns_the_same_embedding_and_normalises_whitespace(text_encoder):
    first = text_encoder.encode(["segment  vehicles "])
    again = text_encoder.encode(["segment vehicles"])
    assert torch.equal(first, again)
    assert "segment vehicles" in text_encoder._cache


@pytest.mark.parametrize("prompts, match", [([], "no prompt"), (["ok", "  "], "prompt 1 is empty"), ([""], "prompt 0")])
def test_empty_prompts_are_errors(prompts, match):
    with pytest.raises(ValueError, match=match):
        validate_prompts(prompts)


def test_model_adapters_are_cached_by_prompt_only_at_inference(tiny_config, text_encoder):
    from talora.model.loading import build_task_aware_sam

    torch.manual_seed(0)
    tiny_model = build_task_aware_sam(tiny_config, text_encoder)  # its parts passed in
    tiny_model.eval()
    with torch.no_grad():
        a = tiny_model.adapters(["segment vehicles", "segment fruit"])
        b = tiny_model.adapters(["segment fruit"])
    assert a.num_rows == 2 and b.num_rows == 1
    name = tiny_model.targets[0].name
    assert torch.equal(a.weights[name][0][1], b.weights[name][0][0])
    assert len(tiny_model._adapter_cache) == 2
    tiny_model.train()
    assert not tiny_model._adapter_cache  # training invalidates it
    adapter = tiny_model.adapters(["segment vehicles"])
    assert adapter.weights[name][0].requires_grad  # and the graph reaches the hypernet


def test_an_embedding_table_stands_in_for_the_model_with_the_same_embeddings(text_encoder, tmp_path, monkeypatch):
    from talora.core.text import TABLE_ENV, TextEncoder, write_embedding_table

    path = str(tmp_path / "table.safetensors")
    assert write_embedding_table(["segment vehicles", "segment  red objects", "segment vehicles"], path,
                                 text_encoder) == 2
    monkeypatch.setenv(TABLE_ENV, path)
    table = TextEncoder()
    assert table.model is None and table.dim == 384
    prompts = ["segment red objects", "segment vehicles"]
    assert torch.equal(table.encode(prompts), text_encoder.encode(prompts))
    with pytest.raises(ValueError, match=r"'segment fruit' is not in the text-embedding table .*table.safetensors"):
        table.encode(["segment vehicles", "segment fruit"])


def test_a_file_that_is_not_a_table_is_refused_naming_the_variable(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from talora.core.text import TABLE_ENV, TextEncoder

    path = str(tmp_path / "other.safetensors")
    save_file({"weights": torch.zeros(2)}, path)
    monkeypatch.setenv(TABLE_ENV, path)
    with pytest.raises(ValueError, match=f"{TABLE_ENV}=.*other.safetensors is not a text-embedding table"):
        TextEncoder()
