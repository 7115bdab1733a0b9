"""A transformers model's own ``save_pretrained`` of a quantized model, then ``from_pretrained``.

``import aofx.hf`` makes ``PreTrainedModel.save_pretrained`` record aofx's configs from the live model
at save time (fqns from the saved root, the layers it holds now), refuse layers that a checkpoint cannot
rebuild, and ``from_pretrained`` refuse a checkpoint that lacks packed tensors its config names. Every
check writes real safetensors files and loads them with transformers; nothing is downloaded.

The LMs here are float32: ``tests.models`` casts its models to bfloat16, which rounds the rotary
``inv_freq`` buffer that ``from_pretrained`` recomputes in float32, and logits would then differ in
their last bit for reasons of transformers' own.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import aofx
import aofx.hf  # registers the "aofx" method; save_pretrained records the configs
from aofx.install import QuantizedModule
from tests.models import FFN, HIDDEN, SPECS, VOCAB


def llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False, **kw)


def llama(config=None, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config or llama_config()).eval()


LM_INPUTS = SPECS["llama"].inputs()


def logits(model, inputs=LM_INPUTS):
    with torch.no_grad():
        return model(**inputs).logits


def quantized(model) -> set:
    return {fqn for fqn, m in model.named_modules() if isinstance(m, QuantizedModule)}


def saved_keys(d) -> set:
    keys = set()
    for path in d.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    assert keys, f"no safetensors file in {d}"
    return keys


def recorded(d) -> dict:
    """The aofx configs (by parameter fqn) that ``config.json`` names; {} where it names none."""
    qc = json.loads((d / "config.json").read_text()).get("quantization_config")
    assert qc is None or qc["quant_method"] == "aofx", qc
    return {} if qc is None else qc["configs"]


def save_and_reload(model, d, cls=AutoModelForCausalLM, **kw):
    model.save_pretrained(d)
    return cls.from_pretrained(d, **kw).eval()


# ---------------------------------------------------------------- quantize_ on part of the model


@pytest.mark.parametrize("part", ["model", "model.layers"])
def test_quantize_submodule_then_save_pretrained(part, tmp_path):
    """``quantize_(model.model)`` (a PreTrainedModel sharing ``model.config``) or ``model.model.layers``
    (a ModuleList): the checkpoint names full fqns from the saved root and reloads quantized."""
    model = llama()
    aofx.quantize_(model.get_submodule(part), aofx.Int8WeightOnlyConfig())
    ref, layers = logits(model), quantized(model)
    assert len(layers) == 14 and "lm_head" not in layers  # 7 linears in each of 2 decoder layers
    back = save_and_reload(model, tmp_path)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)
    assert quantized(back) == layers
    assert set(recorded(tmp_path)) == {f"{fqn}.weight" for fqn in layers}
    assert {f"{fqn}.qdata" for fqn in layers} <= saved_keys(tmp_path)


def test_second_quantize_on_submodule_is_saved(tmp_path):
    """A second ``quantize_`` on a submodule after one on the whole model: both are in the checkpoint."""
    model = llama()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: "self_attn." in fqn)
    aofx.quantize_(model.model.layers[1].mlp, aofx.Int8WeightOnlyConfig(group_size=64))
    ref, layers = logits(model), quantized(model)
    back = save_and_reload(model, tmp_path)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)
    assert quantized(back) == layers and "model.layers.1.mlp.up_proj" in layers
    assert recorded(tmp_path)["model.layers.1.mlp.up_proj.weight"] != \
        recorded(tmp_path)["model.layers.1.self_attn.q_proj.weight"]


def test_resize_token_embeddings_then_save_pretrained(tmp_path):
    """``resize_token_embeddings`` after ``quantize_`` builds a new float ``lm_head``: the checkpoint must
    not name the old quantized head (its packed tensors are gone)."""
    model = llama()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert "lm_head" in quantized(model)
    model.resize_token_embeddings(VOCAB + 16, mean_resizing=False)
    assert "lm_head" not in quantized(model)
    ref, layers = logits(model), quantized(model)
    assert ref.shape[-1] == VOCAB + 16
    back = save_and_reload(model, tmp_path)
    torch.testing.assert_close(logits(back), ref, rtol=0, atol=0)
    assert quantized(back) == layers
    assert "lm_head.weight" not in recorded(tmp_path) and "lm_head.weight" in saved_keys(tmp_path)


def test_float_model_sharing_config_saves_float(tmp_path):
    """Two models built from one config object, one quantized: the float one saves as a float checkpoint,
    and the quantized one (saved after it) still saves quantized."""
    cfg = llama_config()
    float_model, quant_model = llama(cfg, seed=0), llama(cfg, seed=1)
    assert float_model.config is quant_model.config
    aofx.quantize_(quant_model, aofx.Int8WeightOnlyConfig())
    ref_float, ref_quant = logits(float_model), logits(quant_model)

    back_float = save_and_reload(float_model, tmp_path / "float")
    torch.testing.assert_close(logits(back_float), ref_float, rtol=0, atol=0)
    assert quantized(back_float) == set()
    assert recorded(tmp_path / "float") == {}
    assert not any(k.endswith(".qdata") for k in saved_keys(tmp_path / "float"))

    back_quant = save_and_reload(quant_model, tmp_path / "quant")
    torch.testing.assert_close(logits(back_quant), ref_quant, rtol=0, atol=0)
    assert quantized(back_quant) == quantized(quant_model) != set()


# ---------------------------------------------------------------- refusals


@pytest.mark.filterwarnings("ignore:aofx.quantize_ skipped")  # the 3-D expert weights stay float
def test_example_inputs_layers_refuse_save_pretrained(tmp_path):
    """Mixtral's routers are found only by running ``example_inputs`` (they are not linear layers); a
    checkpoint cannot find them again, so ``model.save_pretrained`` raises and writes nothing."""
    spec = SPECS["mixtral"]
    model, inputs = spec.build(), spec.inputs()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=inputs)
    routers = [fqn for fqn in quantized(model) if fqn.endswith("mlp.gate")]
    assert routers, sorted(quantized(model))
    with pytest.raises(ValueError, match=r"cannot save .*mlp\.gate.*found these through example_inputs"):
        model.save_pretrained(tmp_path / "out")
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.safetensors"))


def test_from_pretrained_refuses_missing_packed_tensors(tmp_path):
    """A checkpoint whose ``quantization_config`` names a layer it holds as a float weight (config edited,
    or recorded before the model changed) is refused instead of loading uninitialized packed buffers."""
    model = llama()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(),
                   filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
    assert quantized(model) and "lm_head" not in quantized(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]["configs"]
    qc["lm_head.weight"] = qc["model.layers.0.mlp.up_proj.weight"]  # lm_head was saved float
    path.write_text(json.dumps(config))
    assert "lm_head.qdata" not in saved_keys(tmp_path)
    with pytest.raises(ValueError, match=r"packed tensors.*lm_head\.qdata"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_block_missing_its_packed_tensors(tmp_path):
    # layer 0's tensors of the same name must not vouch for layer 1's
    from safetensors.torch import load_file, save_file

    model = llama()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("model.layers.1.mlp.up_proj.")}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"packed tensors.*model\.layers\.1\.mlp\.up_proj\.qdata"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- other architectures


def test_t5_keep_in_fp32_modules_reload_in_float16(tmp_path):
    """T5 keeps ``wo`` in float32 when loaded in float16 (``_keep_in_fp32_modules``); its quantized ``wo``
    must compute in float32 after a float16 reload too, where float16 would overflow."""
    T5 = transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    base = T5(SPECS["t5"].build().config).eval()  # the helper's config, float32
    with torch.no_grad():  # real T5 checkpoints' wo activations exceed float16's range: emulate that
        for block in base.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3e5)
    base.save_pretrained(tmp_path / "float")
    model = T5.from_pretrained(tmp_path / "float", dtype=torch.float16).eval()
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    inputs = SPECS["t5"].inputs()

    def run(m):
        seen = []
        hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: seen.append((name, o.dtype)))
                 for name, mod in m.named_modules() if name.endswith(("DenseReluDense.wo", "layer.0.SelfAttention.q"))]
        with torch.no_grad():
            out = m(**inputs).encoder_last_hidden_state
        for h in hooks:
            h.remove()
        return out, dict(seen)

    ref, ref_dtypes = run(model)
    assert torch.isfinite(ref).all()
    back = save_and_reload(model, tmp_path / "quant", cls=T5, dtype=torch.float16)
    assert quantized(back) == quantized(model)
    out, dtypes = run(back)
    wo = [n for n in dtypes if n.endswith("wo")]
    assert wo and all(isinstance(back.get_submodule(n), QuantizedModule) for n in wo)
    assert {n: dtypes[n] for n in wo} == {n: torch.float32 for n in wo}, dtypes
    assert all(d == torch.float16 for n, d in dtypes.items() if n.endswith(".q")), dtypes
    assert dtypes == ref_dtypes
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_llava_language_model_only(tmp_path):
    """A VLM with only its language model quantized (the vision tower float): fqns from the saved root."""
    image_token, image_seq = VOCAB - 1, 17  # (32 / 8) ** 2 patches + the class token
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=llama_config(), image_token_id=image_token, vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_seq_length=image_seq)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    aofx.quantize_(model.model.language_model, aofx.Int8WeightOnlyConfig())
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.cat([torch.full((2, image_seq), image_token),
                                      torch.randint(3, VOCAB - 4, (2, 6), generator=g)], 1),
              "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ref, layers = logits(model, inputs), quantized(model)
    assert layers and all(fqn.startswith("model.language_model.") for fqn in layers)
    back = save_and_reload(model, tmp_path, cls=transformers.LlavaForConditionalGeneration)
    torch.testing.assert_close(logits(back, inputs), ref, rtol=0, atol=0)
    assert quantized(back) == layers


def test_a_model_whose_keys_transformers_renames_reloads(tmp_path):
    # ViT is saved under its legacy names (encoder.layer.0.attention.attention.query) and renamed on load
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5)).eval()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert quantized(reloaded) == quantized(model)
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)


def test_an_architecture_that_merges_weights_on_save_is_refused_at_save_time(tmp_path):
    """GTE's checkpoint conversion merges q/k/v into qkv_proj (and gate/up) while saving; packed tensors
    merged that way cannot load, so save_pretrained says so, and aofx.save_quantized works instead."""
    torch.manual_seed(0)
    config = transformers.GteConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=FFN, max_position_embeddings=128)
    model = transformers.GteForMaskedLM(config).eval().to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    float_model = transformers.GteForMaskedLM(config).eval().to(torch.bfloat16)
    float_model.save_pretrained(tmp_path / "float")  # the float model round-trips (for contrast)
    transformers.GteForMaskedLM.from_pretrained(tmp_path / "float")
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match=r"GteForMaskedLM.save_pretrained: transformers merged or renamed .* "
                                         r"aofx\.save_quantized"):
        model.save_pretrained(tmp_path / "quant")
    aofx.save_quantized(model, tmp_path / "model.safetensors")
    with aofx.init_empty_weights():
        skeleton = transformers.GteForMaskedLM(config).to(torch.bfloat16)
    aofx.load_quantized(skeleton, tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(skeleton.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_two_quantized_linears_sharing_a_tied_weight_save_and_reload(tmp_path):
    """NeoMME ties its embedding projection to its unembedding projection, both nn.Linear: quantized,
    they share packed tensors, which safetensors refuses; the save writes a copy for each."""
    config = transformers.NeoMMEConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"],
        per_layer_config={"0": {"sliding_window": 1024}, "1": {"sliding_window": None}})
    torch.manual_seed(0)
    model = transformers.NeoMMEForMaskedLM(config).eval().to(torch.bfloat16)
    tied = model.model.embed_tokens.embedding_projection
    assert model.unembedding_projection.weight is tied.weight
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert model.unembedding_projection.qdata is tied.qdata
    model.save_pretrained(tmp_path)
    assert model.unembedding_projection.qdata is tied.qdata  # still shared after saving
    back = transformers.NeoMMEForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_falcon_mamba_computes_in_session_as_reloaded(tmp_path):
    """FalconMamba's (and Jamba's) mixer calls ``dt_proj`` only where ``config._is_quantized`` is set, which
    transformers sets on a quantized load; else it reads ``dt_proj.weight`` (dequantized, its activations never
    quantized). ``quantize_`` sets it too, so the model computes in session as its checkpoint reloads."""
    config = transformers.FalconMambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=16, num_hidden_layers=2,
                                            expand=2, conv_kernel=4, time_step_rank=16, use_mambapy=False)
    torch.manual_seed(0)
    model = transformers.FalconMambaForCausalLM(config).eval()
    aofx.quantize_(model, aofx.Int8DynamicActivationInt8WeightConfig())
    assert "backbone.layers.0.mixer.dt_proj" in quantized(model) and model.config._is_quantized is True
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))

    def run(m):
        calls = []
        hook = m.backbone.layers[0].mixer.dt_proj.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            out = m(input_ids=ids).logits
        hook.remove()
        assert calls, "dt_proj's quantized forward did not run"
        return out

    ref = run(model)
    back = save_and_reload(model, tmp_path, cls=transformers.FalconMambaForCausalLM)
    assert "_is_quantized" not in json.loads((tmp_path / "config.json").read_text())  # transformers drops it
    assert back.config._is_quantized is True and quantized(back) == quantized(model)
    torch.testing.assert_close(run(back), ref, rtol=0, atol=0)


@pytest.mark.parametrize("config", [aofx.Int8WeightOnlyConfig(), aofx.Int4WeightOnlyConfig(group_size=128)],
                         ids=["int8wo", "int4wo-128"])
def test_a_checkpoint_loads_into_the_bare_model_and_back(config, tmp_path):
    # transformers strips or adds base_model_prefix ("model.") when a checkpoint saved with a head loads
    # into the bare model, and back; the quantized layers must follow, not come back float and random.
    full = llama()
    aofx.quantize_(full, config)
    full.save_pretrained(tmp_path / "full")
    bare = transformers.AutoModel.from_pretrained(tmp_path / "full").eval()
    assert quantized(bare) == {k.removeprefix("model.") for k in quantized(full) if k.startswith("model.")}
    with torch.no_grad():
        torch.testing.assert_close(bare(**LM_INPUTS).last_hidden_state, full.model(**LM_INPUTS).last_hidden_state,
                                   rtol=0, atol=0)
    bare.save_pretrained(tmp_path / "bare")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bare").eval()
    assert quantized(again) >= {f"model.{k}" for k in quantized(bare)}
    with torch.no_grad():
        torch.testing.assert_close(again.model(**LM_INPUTS).last_hidden_state,
                                   bare(**LM_INPUTS).last_hidden_state, rtol=0, atol=0)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    model = llama()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["configs"] = {f"nowhere.{k}": v
                                                for k, v in config["quantization_config"]["configs"].items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names layers that LlamaForCausalLM lacks"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
