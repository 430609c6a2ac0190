"""GPT-OSS (mixture of experts, attention sinks, sliding windows, YaRN) against transformers on
the same weights, its shards under tensor parallelism, and its named 20B shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.interface import AttentionBackend
from runtime.attention.reference import TorchAttention
from runtime.attention.triton_paged import TritonAttention
from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.layers import mxfp4
from runtime.layers.moe import MoE
from runtime.layers.rotary import RotaryEmbedding
from runtime.loader import load_checkpoint, load_dummy
from runtime.model_names import named_architecture
from runtime.model_runner import use_cpu_kernels, use_fused_experts
from runtime.models.llama import LlamaForCausalLM
from runtime.parallel import SINGLE, TensorParallel
from runtime.quantization import weight_bytes
from runtime.sequence import SamplingParams
from tests.runtime.paged import Chunk, new_caches, prefill, run_step
from tests.runtime.ranks import assert_two_ranks_give_the_tokens_of_one

TOLERANCE = 1e-4  # max abs logit difference, float32 on CPU
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}  # fmt: skip
# Three layers: sliding, full, sliding. A window of 6 over a 40-token prompt, so most keys of
# a sliding layer are outside it; 4 experts, 2 a token, of 64 columns (two MXFP4 groups).
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
             num_experts_per_tok=2, sliding_window=6, max_position_embeddings=256,
             rope_parameters=YARN)  # fmt: skip
PROMPT = [(i * 37 + 11) % 320 for i in range(40)]


def _raw(**changes: object) -> dict[str, object]:
    """SHAPE's config.json, as transformers writes it."""
    config = transformers.GptOssConfig(**SHAPE).to_dict()
    return config | {"architectures": ["GptOssForCausalLM"], **changes}


def _hf_checkpoint(tmp: Path) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**SHAPE, initializer_range=0.1)
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        # transformers starts biases at zero, which would hide a bias loaded into the wrong
        # expert or column; sinks of about +-2 move each head's weights visibly.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif name.endswith("sinks"):
                param.normal_(0.0, 2.0)
    model.save_pretrained(tmp)
    return model.eval()  # type: ignore[no-any-return]


def _ours(
    path: Path,
    backend: AttentionBackend | None = None,
    quantization: str | None = None,
    tp: TensorParallel = SINGLE,
) -> LlamaForCausalLM:
    cfg = ModelConfig.from_hf(path)
    model = LlamaForCausalLM(cfg, backend or TorchAttention(), tp, quantization).eval()
    load_checkpoint(model, path)
    return model


def _reference_logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "c-kernels"])
def test_prefill_logits_match_transformers(tmp_path: Path, kernels: bool) -> None:
    expected = _reference_logits(_hf_checkpoint(tmp_path))
    model = _ours(tmp_path)
    if kernels:  # norms, rotary, linears and experts in C (the experts' float weights dropped)
        use_cpu_kernels(model, quantization=None)
        assert all(layer.mlp.experts.gate_up_proj is None for layer in model.model.layers)
    got = prefill(model, PROMPT)
    assert (got - expected).abs().max().item() < TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("backend", [TorchAttention, CpuKernelAttention])
def test_decoding_token_by_token_matches_transformers(
    tmp_path: Path, backend: type[AttentionBackend]
) -> None:
    """Each decode step reads the cache through the backend's decode path: the window moves
    along the context and the sinks join every softmax."""
    expected = _reference_logits(_hf_checkpoint(tmp_path))
    model, block_size, prefix = _ours(tmp_path, backend()), 4, 9
    blocks = list(range(-(-len(PROMPT) // block_size)))
    caches = new_caches(model, len(blocks), block_size)
    got = [run_step(model, caches, [Chunk(PROMPT[:prefix], 0, blocks)])[0]]
    for position in range(prefix, len(PROMPT)):
        got.append(run_step(model, caches, [Chunk([PROMPT[position]], position, blocks)])[0])
    assert (torch.cat(got) - expected).abs().max().item() < TOLERANCE


def test_fused_experts_give_the_logits_and_make_decode_capturable(tmp_path: Path) -> None:
    """The GPU path (Triton, here in its interpreter): the experts through moe_triton.py's
    kernels, and with them nothing left in a decode step that syncs with the host."""
    expected = _reference_logits(_hf_checkpoint(tmp_path))
    model = _ours(tmp_path, TritonAttention())
    assert not model.supports_cuda_graphs  # torch's grouping reads group sizes on the host
    assert use_fused_experts(model) == SHAPE["num_hidden_layers"]
    assert model.supports_cuda_graphs
    assert (prefill(model, PROMPT) - expected).abs().max().item() < TOLERANCE


def _mxfp4_checkpoint(tmp: Path) -> transformers.PreTrainedModel:
    """A checkpoint as OpenAI ships GPT-OSS: expert weights as MXFP4 blocks and scales (random
    bytes, so every nibble occurs), and transformers' model with its own dequantisation of
    them, for the reference logits."""
    hf = _hf_checkpoint(tmp)
    file = tmp / "model.safetensors"
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, experts in enumerate(m.mlp.experts for m in hf.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                param = getattr(experts, proj)  # [experts, in, out]
                e, inner, rows = param.shape
                blocks = torch.randint(0, 256, (e, rows, inner // 32, 16), generator=gen,
                                       dtype=torch.uint8)  # fmt: skip
                scales = torch.randint(119, 124, (e, rows, inner // 32), generator=gen,
                                       dtype=torch.uint8)  # fmt: skip
                param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
                name = f"model.layers.{layer}.mlp.experts.{proj}"
                del tensors[name]
                tensors |= {f"{name}_blocks": blocks, f"{name}_scales": scales}
    save_file(tensors, file, metadata={"format": "pt"})
    return hf


def test_fused_mxfp4_experts_give_the_checkpoints_logits(tmp_path: Path) -> None:
    """The GPU path of --quantization mxfp4 (Triton's interpreter here): the fused kernels
    read the experts as MXFP4, and decode stays capturable."""
    expected = _reference_logits(_mxfp4_checkpoint(tmp_path))
    model = _ours(tmp_path, TritonAttention(), "mxfp4")
    assert use_fused_experts(model) == SHAPE["num_hidden_layers"]
    assert model.supports_cuda_graphs
    assert (prefill(model, PROMPT) - expected).abs().max().item() < TOLERANCE


def test_an_mxfp4_checkpoint_loads_dequantised(tmp_path: Path) -> None:
    expected = _reference_logits(_mxfp4_checkpoint(tmp_path))
    assert (prefill(_ours(tmp_path), PROMPT) - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "c-kernels"])
def test_mxfp4_experts_keep_the_checkpoints_bytes(tmp_path: Path, kernels: bool) -> None:
    """--quantization mxfp4 builds the experts in MXFP4 (never float) and copies an MXFP4
    checkpoint's bytes into them, so the logits are the checkpoint's."""
    expected = _reference_logits(_mxfp4_checkpoint(tmp_path))
    cfg = ModelConfig.from_hf(tmp_path)
    built = LlamaForCausalLM(cfg, TorchAttention(), SINGLE, "mxfp4")
    assert all(layer.mlp.experts.gate_up_proj is None for layer in built.model.layers)
    model = _ours(tmp_path, quantization="mxfp4")
    if kernels:  # the linears packed for panel_gemm.c, the experts left in MXFP4
        use_cpu_kernels(model, quantization="mxfp4")
    experts = model.model.layers[0].mlp.experts
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(experts.down_proj_blocks,
                       stored["model.layers.0.mlp.experts.down_proj_blocks"])  # fmt: skip
    # 4.25 bits a value against float32's 32 (the biases stay float)
    assert weight_bytes(experts) < weight_bytes(_ours(tmp_path).model.layers[0].mlp.experts) / 6
    assert (prefill(model, PROMPT) - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("rank", [0, 1])
def test_mxfp4_shards_hold_the_float_shards_values(tmp_path: Path, rank: int) -> None:
    """Rank r of 2 copies its rows (gate_up) and groups (down) of the checkpoint's bytes: they
    dequantise to the float shard the dequantising path gives the same rank."""
    _mxfp4_checkpoint(tmp_path)
    tp = TensorParallel(rank, 2)
    ours, floats = _ours(tmp_path, quantization="mxfp4", tp=tp), _ours(tmp_path, tp=tp)
    for layer, float_layer in zip(ours.model.layers, floats.model.layers, strict=True):
        experts, want = layer.mlp.experts, float_layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            blocks, scales = (getattr(experts, f"{name}_{p}") for p in ("blocks", "scales"))
            assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32),
                               getattr(want, name))  # fmt: skip


def test_float_weights_quantise_as_they_load_as_the_whole_weight_would(tmp_path: Path) -> None:
    """A float checkpoint and dummy weights into an MXFP4 model: each expert quantised as it
    arrives gives the bytes that quantising the float model's weight gives."""
    _hf_checkpoint(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    for load in (lambda m: load_checkpoint(m, tmp_path), lambda m: load_dummy(m, seed=5)):
        models = [LlamaForCausalLM(cfg, TorchAttention(), SINGLE, q) for q in ("mxfp4", None)]
        for model in models:
            load(model)
        ours, floats = (m.model.layers[2].mlp.experts for m in models)
        for name in ("gate_up_proj", "down_proj"):
            blocks, scales = mxfp4.quantize(getattr(floats, name))
            assert torch.equal(getattr(ours, f"{name}_blocks"), blocks), name
            assert torch.equal(getattr(ours, f"{name}_scales"), scales), name
        assert torch.equal(ours.gate_up_proj_bias, floats.gate_up_proj_bias)


def test_mxfp4_rounds_each_value_within_half_the_widest_fp4_step() -> None:
    w = torch.randn(3, 8, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    blocks, scales = mxfp4.quantize(w)
    got = mxfp4.dequantize(blocks, scales, torch.float32)
    # FP4's widest step is 2 (between 4 and 6), so no value is more than 1 scale unit away,
    # and the scale is the smallest that keeps each group's largest within 6.
    unit = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, -1)
    assert ((got - w).abs() <= unit).all()
    groups = w.abs().reshape(3, 8, 3, 32).amax(-1)
    assert (groups <= 6 * unit[..., ::32]).all() and (groups > 3 * unit[..., ::32]).all()


def test_mxfp4_is_refused_where_it_cannot_apply(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mxfp4 stores a mixture of experts' experts"):
        Engine(EngineConfig(model="tiny", quantization="mxfp4"))
    (tmp_path / "config.json").write_text(json.dumps(_raw(intermediate_size=96)))
    with pytest.raises(ValueError, match=r"intermediate_size / tensor_parallel_size \(48\)"):
        Engine(EngineConfig(model=str(tmp_path), load_format="dummy", quantization="mxfp4",
                            tensor_parallel_size=2))  # fmt: skip


def test_yarn_rotation_matches_transformers() -> None:
    config = transformers.GptOssConfig(**SHAPE)
    hf = transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 5, 63, 64, 200, 255]])
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    ours = ModelConfig.from_hf(_raw())
    assert ours.rope_scaling is not None and ours.rope_scaling["rope_type"] == "yarn"
    rope = RotaryEmbedding(ours.head_dim, ours.max_position_embeddings, ours.rope_theta,
                           ours.rope_scaling)(positions[0])  # fmt: skip
    half = ours.head_dim // 2
    # Ours holds both halves (rotate-half form) with the first half of sin negated;
    # transformers computes the angles in float32 (3e-6 off at position 255).
    assert torch.allclose(rope.cos[:, 0, :half], cos[0], atol=1e-5)
    assert torch.allclose(-rope.sin[:, 0, :half], sin[0], atol=1e-5)
    assert rope.cos[0, 0, 0].item() == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_parameter_count_matches_transformers() -> None:
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**SHAPE))
    ours = ModelConfig.from_hf(_raw())
    assert ours.num_parameters == sum(p.numel() for p in model.parameters())


def test_the_named_20b_shape() -> None:
    path = named_architecture("gpt-oss-20b")
    assert path is not None
    cfg = ModelConfig.from_hf(path)
    assert cfg.moe is not None and (cfg.moe.num_experts, cfg.moe.top_k) == (32, 4)
    # OpenAI's model card: 21B parameters (20.9B), 24 layers alternating window 128 and full.
    assert 20.8e9 < cfg.num_parameters < 21.0e9
    assert 3.55e9 < cfg.active_parameters < 3.65e9  # "3.6B active parameters per token"
    assert [cfg.window_of(i) for i in range(4)] == [128, None, 128, None]
    cfg.check_tensor_parallel(2)  # the deployment this project is for: two GPUs


def test_bad_layer_types_are_named() -> None:
    with pytest.raises(ValueError, match="layer_types: expected 3 entries"):
        ModelConfig.from_hf(_raw(layer_types=["full_attention"]))


def _moe_shard(cfg: ModelConfig, rank: int, size: int) -> MoE:
    model = LlamaForCausalLM(cfg, TorchAttention(), TensorParallel(rank, size))
    load_dummy(model, seed=3)
    with torch.no_grad():  # dummy biases are zero: give the MLP's values to be sliced
        for name, param in model.named_parameters():
            if ".mlp." in name and name.endswith("bias"):
                g = torch.Generator().manual_seed(len(name))
                full = torch.randn(getattr(param, "logical_shape", param.shape), generator=g)
                param.weight_loader(param, full, None)  # type: ignore[attr-defined]
    return model.model.layers[0].mlp  # type: ignore[no-any-return]


def test_expert_shards_sum_to_the_whole_expert() -> None:
    """Rank 0 and rank 1 of 2 each compute a partial MoE output over their columns; the sum
    (the all-reduce, done by hand here) is one rank's output."""
    cfg = ModelConfig.from_hf(_raw())
    whole, halves = _moe_shard(cfg, 0, 1), [_moe_shard(cfg, r, 2) for r in (0, 1)]
    assert halves[0].experts.gate_up_proj.shape == (4, 64, 64)  # 32 gate + 32 up rows
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top, experts = torch.topk(whole.router(x), 2, dim=-1)
        weights = torch.softmax(top, dim=-1)
        parts = sum(h.experts(x, experts, weights) for h in halves)
        assert torch.allclose(parts, whole.experts(x, experts, weights), atol=1e-5)
        assert torch.equal(halves[1].router.weight, whole.router.weight)  # replicated


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + j) % 300 + 3 for j in range(n)] for i, n in enumerate((3, 17, 40, 9))]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "mxfp4"])
def test_two_ranks_give_the_greedy_tokens_of_one(tmp_path: Path, quantization: str | None) -> None:
    """With mxfp4 each rank quantises its own columns of the experts: whole groups, so the
    same values as one rank's."""
    _hf_checkpoint(tmp_path)
    cfg = EngineConfig(model=str(tmp_path), max_model_len=256, num_kv_blocks=64,
                       quantization=quantization)  # fmt: skip
    assert_two_ranks_give_the_tokens_of_one(cfg, PROMPTS, GREEDY)


def test_kernels_name_the_expert_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_raw()))
    engine = Engine(EngineConfig(model=str(tmp_path), load_format="dummy", max_model_len=128,
                                 num_kv_blocks=16))  # fmt: skip
    # float32 on the CPU: the experts' weights packed for panel_gemm.c, as the linears' are
    assert engine.kernels()["experts"] == "panel-gemm"
    assert len(engine.generate([PROMPT[:12]], GREEDY)[0]) == GREEDY.max_tokens
