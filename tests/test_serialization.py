"""save_quantized / load_quantized, and transformers' from_pretrained through aofx.hf."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import aofx
from tests.common import CONFIGS


def _build():
    torch.manual_seed(0)
    a = nn.Linear(128, 128, bias=False)
    b = nn.Linear(128, 128, bias=False)
    b.weight = a.weight  # tied linears: one set of packed tensors
    return nn.Sequential(a, nn.ReLU(), b, nn.Linear(128, 32)).bfloat16()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("on_meta", [False, True], ids=["float", "meta"])
def test_save_then_load_into_a_fresh_model(config, on_meta, tmp_path):
    model = _build()
    aofx.quantize_(model, config)
    path = tmp_path / "model.safetensors"
    aofx.save_quantized(model, path)
    with safe_open(str(path), "pt") as f:
        saved = json.loads(f.metadata()["aofx.configs"])
    assert set(saved) == {"0.weight", "2.weight", "3.weight"}
    if on_meta:
        with torch.device("meta"):
            fresh = _build()
    else:
        fresh = _build()
        with torch.no_grad():  # different float weights: the file's tensors must win
            for p in fresh.parameters():
                p.add_(1.0)
    aofx.load_quantized(fresh, path)
    x = torch.randn(5, 128).bfloat16()
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].qdata is fresh[2].qdata  # still tied after the round trip
    assert all(not t.is_meta for t in fresh.state_dict().values())


def test_mixed_configs_round_trip(tmp_path):
    model = _build()
    fp8 = aofx.Float8DynamicActivationFloat8WeightConfig(granularity=aofx.PerRow())
    aofx.quantize_(model, aofx.FqnToConfig({"3": fp8, "_default": aofx.Int4WeightOnlyConfig(group_size=32)}))
    aofx.save_quantized(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = _build()
    aofx.load_quantized(fresh, tmp_path / "m.safetensors")
    assert fresh[3].scale.shape == (32,) and fresh[0].zero.dtype == torch.bfloat16
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(fresh(x), model(x))


def test_load_needs_aofx_metadata(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="aofx.configs"):
        aofx.load_quantized(_build(), tmp_path / "plain.safetensors")


def _tiny_llama(tied=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_gpt2():  # Conv1D layers, and a head tied to the token embedding
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=128)).eval()


MODELS = [pytest.param(_tiny_llama, id="llama"), pytest.param(lambda: _tiny_llama(tied=True), id="llama-tied"),
          pytest.param(_tiny_gpt2, id="gpt2")]


def _hf_save(model, path):
    import aofx.hf

    aofx.hf.save_pretrained(model, path)


SAVES = [pytest.param(_hf_save, id="aofx.hf"), pytest.param(lambda model, path: model.save_pretrained(path), id="own")]


@pytest.mark.parametrize("save", SAVES)
@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize("config", CONFIGS[1:6:2])
def test_from_pretrained_returns_the_quantized_model(config, build, save, tmp_path):
    transformers = pytest.importorskip("transformers")

    model = build()
    embedding = model.get_input_embeddings().weight.detach().clone()
    aofx.quantize_(model, config)
    ids = torch.randint(0, 128, (2, 7))
    ref = model(ids).logits
    save(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.lm_head).__name__ == "QuantizedLinear"
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.get_input_embeddings().weight, embedding)  # a tied embedding stays float
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)


def test_a_float_checkpoint_still_loads_as_a_float_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    import aofx.hf  # noqa: F401  (registers the "aofx" method)

    _tiny_llama().save_pretrained(tmp_path)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).lm_head) is nn.Linear


@pytest.mark.parametrize("config", CONFIGS[1:6:2])
def test_load_into_a_model_built_with_empty_weights_keeps_computed_buffers(config, tmp_path):
    model = _tiny_llama()
    aofx.quantize_(model, config)
    aofx.save_quantized(model, tmp_path / "m.safetensors")
    with aofx.init_empty_weights():
        fresh = type(model)(model.config).eval()
    assert fresh.lm_head.weight.is_meta and not fresh.model.rotary_emb.inv_freq.is_meta
    aofx.load_quantized(fresh, tmp_path / "m.safetensors")
    ids = torch.randint(0, 128, (2, 7))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # the context is over


def test_save_refuses_layers_found_through_example_inputs(tmp_path):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 64) / 8)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w)

    model = nn.Sequential(Custom(), nn.Linear(32, 32))
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(torch.randn(4, 64),))
    with pytest.raises(ValueError, match=r"cannot save 0: quantize_ found these through example_inputs"):
        aofx.save_quantized(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


_KINDS = {"int8": aofx.Int8WeightOnlyConfig(), "e4m3": aofx.Float8WeightOnlyConfig(),
          "e4m3-dynamic": aofx.Float8DynamicActivationFloat8WeightConfig(granularity=aofx.PerRow()),
          "int8-dynamic": aofx.Int8DynamicActivationInt8WeightConfig()}


@pytest.mark.parametrize("saved,target", [("int8", "e4m3"), ("e4m3", "int8"), ("e4m3-dynamic", "int8-dynamic"),
                                          ("int8-dynamic", "e4m3-dynamic")])
@pytest.mark.parametrize("assign", [False, True])
def test_another_schemes_codes_are_refused_and_load_nothing(saved, target, assign):
    # Same buffer names and shapes: torch alone would cast e4m3 codes to int8 (or back) and compute garbage.
    source, model = _build(), _build()
    aofx.quantize_(source, _KINDS[saved])
    aofx.quantize_(model, _KINDS[target])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"aofx: 3\.qdata is torch\.\w+ in the state_dict.*same config"):
        model.load_state_dict(source.state_dict(), assign=assign)
    after = model.state_dict()
    for key in ("0.qdata", "3.qdata", "3.scale"):
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key


def test_int8_weight_only_and_dynamic_codes_load_into_each_other():
    # Both keep int8 codes and a per-row fp32 scale: one scheme's state_dict is the other's.
    source, model = _build(), _build()
    aofx.quantize_(source, _KINDS["int8"])
    aofx.quantize_(model, _KINDS["int8-dynamic"])
    model.load_state_dict(source.state_dict())
    assert torch.equal(model.state_dict()["3.qdata"], source.state_dict()["3.qdata"])


def test_load_into_a_model_quantized_with_another_config_is_refused(tmp_path):
    # int8wo and int8dq pack alike: the codes would load, and the model would keep computing int8dq.
    source, model = _build(), _build()
    aofx.quantize_(source, _KINDS["int8"])
    aofx.save_quantized(source, tmp_path / "m.safetensors")
    aofx.quantize_(model, _KINDS["int8-dynamic"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"3\.weight is quantized with Int8DynamicActivationInt8WeightConfig"):
        aofx.load_quantized(model, tmp_path / "m.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("other", ["wider", "deeper"])
def test_a_file_that_does_not_fit_leaves_the_model_float(other, tmp_path):
    source = _build()
    aofx.quantize_(source, _KINDS["int8"])
    aofx.save_quantized(source, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    width = 256 if other == "wider" else 128
    layers = [nn.Linear(128, width, bias=False), nn.ReLU(), nn.Linear(width, 128, bias=False), nn.Linear(128, 32)]
    if other == "deeper":
        layers.append(nn.Linear(32, 32))
    model = nn.Sequential(*layers).bfloat16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model, which is left unchanged"):
        aofx.load_quantized(model, tmp_path / "m.safetensors")
    assert model.state_dict().keys() == before.keys()  # not quantized
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_diffusers_save_pretrained_refuses_a_quantized_model(tmp_path):
    # It would write the packed tensors without their configs, and its from_pretrained would initialize
    # those layers afresh (NaN outputs); a float model of the same class still saves.
    from tests.models import SPECS

    model = SPECS["flux"].build()
    model.save_pretrained(tmp_path / "float")
    assert list((tmp_path / "float").glob("*.safetensors"))
    aofx.quantize_(model, _KINDS["int8"])
    with pytest.raises(ValueError, match="aofx.save_quantized"):
        model.save_pretrained(tmp_path / "quantized")
    assert not list((tmp_path / "quantized").glob("*.safetensors"))


class _Casts(nn.Module):
    """Casts its hidden state to the next layer's weight dtype, as T5 does."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).to(self.down.weight.dtype))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_a_model_cast_before_saving_loads_computing_in_its_dtype(config, dtype, tmp_path, fresh_dynamo):
    torch.manual_seed(0)
    model = _Casts().bfloat16()
    aofx.quantize_(model, config)
    model.to(dtype)
    x = torch.randn(4, 64, dtype=dtype)
    want = model(x)
    aofx.save_quantized(model, tmp_path / "m.safetensors")
    with aofx.init_empty_weights():
        fresh = _Casts()  # float32, as a model is built
    aofx.load_quantized(fresh, tmp_path / "m.safetensors")
    assert fresh.up.weight.dtype == fresh.down.weight.dtype == fresh.up.bias.dtype == dtype
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    torch.testing.assert_close(torch.compile(fresh, fullgraph=True)(x), want, rtol=2e-2, atol=2e-2)
