import pytest

from talora.config import LoraConfig, ModelConfig, default_config, dump_config, load_config


def test_yaml_round_trip_gives_the_same_config():
    config = default_config("vit_b", checkpoint="s3://bucket/sam_vit_b.pth")
    assert load_config(dump_config(config)) == config


def test_partial_yaml_fills_defaults_and_coerces_ints_to_floats():
    config = load_config("lora:\n  rank: 8\n  alpha: 16\n")
    assert config.lora.rank == 8 and config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)
    assert config.sam == ModelConfig().sam


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"lora\.rnak"):
        load_config("lora:\n  rnak: 8\n")


def test_wrong_type_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"lora\.rank: expected int"):
        load_config("lora:\n  rank: eight\n")


def test_unknown_sam_type_is_rejected():
    with pytest.raises(ValueError, match="vit_x"):
        load_config("sam:\n  sam_type: vit_x\n")


def test_tail_blocks_default_per_variant_and_zero_when_encoder_not_adapted():
    assert default_config("vit_tiny").tail_blocks == 1
    assert default_config("vit_h").tail_blocks == 4
    config = ModelConfig(lora=LoraConfig(image_encoder=False))
    assert config.tail_blocks == 0
