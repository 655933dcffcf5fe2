"""Every compat entry (what nemo-optim relies on that a library does not promise) holds for the
installed versions; one that moved fails here with the entry's name and what to update."""

from __future__ import annotations

import json

import pytest

from nemo_optim import compat


@pytest.mark.parametrize("name", sorted(compat.ENTRIES))
def test_compat_entry_holds_for_the_installed_versions(name):
    entry = compat.ENTRIES[name]
    if not entry.applies():
        pytest.skip(f"{name}: applies from {entry.distribution} {entry.since} on; "
                    f"installed {compat.installed(entry.distribution)}")
    assert entry.check() is not None


def test_a_moved_entry_names_itself_the_version_and_where_to_update_it():
    def probe():
        from megatron.core.transformer import transformer_layer

        return transformer_layer.a_name_megatron_never_had

    entry = compat.Entry("renamed_helper", "megatron-core", "transformer_layer.a_name_megatron_never_had",
                         ("0.16.1",), probe)
    with pytest.raises(compat.LibraryMovedError) as caught:
        entry.check()
    message = str(caught.value)
    assert "'renamed_helper'" in message and f"megatron-core {compat.installed('megatron-core')}" in message
    assert "checked on 0.16.1" in message and "nemo_optim/compat.py" in message


def test_version_facts_agree_with_the_installed_libraries():
    import modelopt.torch.quantization as mtq
    from modelopt.torch.speculative.config import EagleConfig

    assert compat.quant_cfg_uses_list_form() == isinstance(mtq.INT8_DEFAULT_CFG["quant_cfg"], list)
    assert ("eagle_use_torch_compile" in compat.eagle_config_defaults()) == (
        "eagle_use_torch_compile" in EagleConfig.model_fields)


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
@pytest.mark.parametrize("scaled", [False, True])
def test_rope_is_read_from_either_config_layout(tmp_path, layout, scaled):
    from nemo_optim.models.hf import LLAMA3_SCALING, config_from_hf

    scaling = {"rope_type": "llama3", "factor": 8.0, **LLAMA3_SCALING} if scaled else None
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
    if layout == "transformers4":
        hf |= {"rope_theta": 500000.0, "rope_scaling": scaling}
    else:
        hf["rope_parameters"] = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = config_from_hf(tmp_path)
    assert config.rotary_base == 500000.0
    assert config.rope_scaling_factor == (8.0 if scaled else None)


@pytest.mark.parametrize("rope", [{}, {"rope_parameters": {"rope_type": "default"}},
                                  {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}])
def test_an_unknown_rope_layout_is_refused_not_defaulted(tmp_path, rope):
    from nemo_optim.errors import InputError
    from nemo_optim.models.hf import config_from_hf

    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, **rope}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(InputError, match="rope"):
        config_from_hf(tmp_path)
