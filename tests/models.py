"""Tiny real models built from their configs (nothing is downloaded), and inputs for them.

Every linear dimension is a multiple of 128 where the architecture allows, so every scheme of
``tests.common.CASES`` (int4 with group size 128 included) applies to every linear layer. Each
``Spec`` knows how to build the float model, make a fixed input and reduce the output to one tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

VOCAB = 256
HIDDEN = 128
FFN = 256


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[..., torch.nn.Module]  # build(seed=0): a float model in eval mode
    inputs: Callable[[], dict]  # keyword inputs, fixed by a seed
    output: Callable[[object], torch.Tensor]  # model output -> one tensor
    dtype: torch.dtype = torch.bfloat16
    is_lm: bool = False  # has .generate


def _seeded(build):
    def make(seed=0):
        torch.manual_seed(seed)
        return build().eval()

    return make


def _tokens(seed=1, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _lm_inputs():
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(out):
    return out.logits


def _hidden(out):
    return out.last_hidden_state


def _sample(out):
    return out.sample


# ---------------------------------------------------------------- transformers


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)  # q/k/v have biases; lm_head shares the embedding
    return Qwen2ForCausalLM(cfg).to(torch.bfloat16)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(torch.bfloat16)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=32, d_ff=FFN, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).to(torch.bfloat16)


def _t5_inputs():
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": _tokens(seed=2, seq=5)}


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).to(torch.bfloat16)


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    # FalconLinear computes ``x @ self.weight.T`` instead of calling F.linear
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                       hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
    return FalconForCausalLM(cfg).to(torch.bfloat16)


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=FFN, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).to(torch.bfloat16)


def _bert_inputs():
    ids = _tokens()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# ---------------------------------------------------------------- diffusers


def flux():
    from diffusers import FluxTransformer2DModel

    # inner dim 4 heads x 32 = 128; rope axes sum to the head dim
    return FluxTransformer2DModel(patch_size=1, in_channels=HIDDEN, num_layers=1, num_single_layers=1,
                                  attention_head_dim=32, num_attention_heads=4, joint_attention_dim=HIDDEN,
                                  pooled_projection_dim=HIDDEN, guidance_embeds=False,
                                  axes_dims_rope=(8, 12, 12)).to(torch.bfloat16)


def _flux_inputs():
    g = torch.Generator().manual_seed(1)
    img, txt = 16, 8  # a 4x4 latent of image tokens, 8 text tokens
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(img), rows.flatten().float(), cols.flatten().float()], dim=-1)
    return {
        "hidden_states": torch.randn(1, img, HIDDEN, generator=g).bfloat16(),
        "encoder_hidden_states": torch.randn(1, txt, HIDDEN, generator=g).bfloat16(),
        "pooled_projections": torch.randn(1, HIDDEN, generator=g).bfloat16(),
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt, 3),
    }


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(128, 128), norm_num_groups=32, cross_attention_dim=HIDDEN,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=4).to(torch.bfloat16)


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 4, 4, generator=g).bfloat16(),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 8, HIDDEN, generator=g).bfloat16(),
    }


SPECS = {
    "llama": Spec("llama", _seeded(llama), _lm_inputs, _logits, is_lm=True),
    "qwen2": Spec("qwen2", _seeded(qwen2), _lm_inputs, _logits, is_lm=True),
    "gpt2": Spec("gpt2", _seeded(gpt2), _lm_inputs, _logits, is_lm=True),
    "t5": Spec("t5", _seeded(t5), _t5_inputs, _logits, is_lm=True),
    "mixtral": Spec("mixtral", _seeded(mixtral), _lm_inputs, _logits, is_lm=True),
    "falcon": Spec("falcon", _seeded(falcon), _lm_inputs, _logits, is_lm=True),
    "bert": Spec("bert", _seeded(bert), _bert_inputs, _hidden),
    "flux": Spec("flux", _seeded(flux), _flux_inputs, _sample),
    "unet": Spec("unet", _seeded(unet), _unet_inputs, _sample),
}
