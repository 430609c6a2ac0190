"""Our Llama-family model against transformers on the same weights, and its weight loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from runtime.attention.reference import TorchAttention
from runtime.config import ModelConfig
from runtime.layers.linear import LinearBase, PanelWeight, pack_weights
from runtime.loader import load_checkpoint, load_dummy
from runtime.model_names import named_architecture
from runtime.model_runner import use_cpu_kernels
from runtime.models.llama import LlamaForCausalLM
from tests.runtime.paged import prefill

TOLERANCE = 1e-4  # max abs logit difference, float32 on CPU (measured: about 2e-6)
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
# transformers' default 0.02 leaves attention nearly uniform and logits near 0, where a wrong
# rotary angle moves logits by less than the tolerance; 0.1 makes every mistake show.
INIT = 0.1
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
PROMPT = [(i * 37 + 11) % 320 for i in range(40)]


def _hf_checkpoint(
    tmp: Path, arch: str, extra: dict[str, object] | None = None, shard_size: str | None = None
) -> transformers.PreTrainedModel:
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    config = config_cls(**SHAPE, initializer_range=INIT, **(extra or {}))
    model = getattr(transformers, arch)(config)
    if shard_size is None:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, max_shard_size=shard_size)
    return model.eval()  # type: ignore[no-any-return]


def _ours(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf(path), TorchAttention()).eval()
    load_checkpoint(model, path)
    return model


def _reference_logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
        ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ("Qwen2ForCausalLM", {}),
        ("Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    ],
    ids=["llama", "llama3-rope-tied", "linear-rope", "qwen2-bias", "qwen3-qk-norm-tied"],
)
@pytest.mark.parametrize("kernels", [False, True], ids=["torch-ops", "c-kernels"])
def test_logits_match_transformers(
    tmp_path: Path, arch: str, extra: dict[str, object], kernels: bool
) -> None:
    expected = _reference_logits(_hf_checkpoint(tmp_path, arch, extra))
    model = _ours(tmp_path)
    if kernels:  # as a float32 CPU engine runs it: norms, activation, rotary and linears in C
        use_cpu_kernels(model, quantization=None)
    got = prefill(model, PROMPT)
    assert (got - expected).abs().max().item() < TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("tied", [False, True])
def test_packed_weights_give_the_same_logits_and_hold_no_second_copy(
    tmp_path: Path, tied: bool
) -> None:
    # Qwen2: biases too, which stay on the layer (partial panels: test_linear_kernel.py)
    _hf_checkpoint(tmp_path, "Qwen2ForCausalLM", {"tie_word_embeddings": tied})
    model = _ours(tmp_path)
    before, count = prefill(model, PROMPT), sum(p.numel() for p in model.parameters())
    changed = pack_weights(model)
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert (
        changed
        == len(layers) + (0 if tied else 1)
        == 4 * SHAPE["num_hidden_layers"] + (0 if tied else 1)
    )
    assert all(isinstance(m.matmul, PanelWeight) and m.weight is None for m in layers)
    # a tied head keeps the embedding's table, which the embedding still looks rows up in
    assert (model.lm_head.matmul is None) == tied
    assert sum(p.numel() for p in model.parameters()) == count
    assert (prefill(model, PROMPT) - before).abs().max().item() < TOLERANCE


def test_sharded_checkpoint_loads_through_its_index(tmp_path: Path) -> None:
    expected = _reference_logits(_hf_checkpoint(tmp_path, "LlamaForCausalLM", shard_size="100KB"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (prefill(_ours(tmp_path), PROMPT) - expected).abs().max().item() < TOLERANCE


def test_checkpoint_missing_a_shard_of_a_fused_projection_is_refused(tmp_path: Path) -> None:
    _hf_checkpoint(tmp_path, "LlamaForCausalLM")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights .*layers\.1\.self_attn\.qkv_proj"):
        _ours(tmp_path)


def test_unsupported_architecture_is_named_with_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="'MistralForCausalLM' is not supported; supported: Ll"):
        ModelConfig.from_hf({"architectures": ["MistralForCausalLM"], **SHAPE})


def _dummy(seed: int, **shape: int) -> dict[str, torch.Tensor]:
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **{**SHAPE, **shape}})
    model = LlamaForCausalLM(cfg, TorchAttention())
    load_dummy(model, seed)
    return dict(model.named_parameters())


def test_dummy_weights_depend_only_on_seed_and_name() -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    a, b, c = _dummy(seed=1), _dummy(seed=1), _dummy(seed=2)
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    # Not on what else the model holds, nor the order parameters are filled in: a deeper model
    # (as a tensor-parallel rank will build its own slice of) agrees on the shared names.
    assert torch.equal(_dummy(seed=1, num_hidden_layers=3)[name], a[name])
    assert torch.equal(a["model.norm.weight"], torch.ones(SHAPE["hidden_size"]))


@pytest.mark.parametrize(
    "name,billions",
    [("llama-3-8b", 8.03), ("llama-3.1-8b", 8.03), ("qwen3-0.6b", 0.596), ("small", 0.056)],
)
def test_named_architectures_have_their_real_shapes(name: str, billions: float) -> None:
    path = named_architecture(name)
    assert path is not None
    assert ModelConfig.from_hf(path).num_parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_llama_3_1_keeps_its_llama3_rope_scaling() -> None:
    path = named_architecture("llama-3.1-8b")
    assert path is not None
    scaling = ModelConfig.from_hf(path).rope_scaling
    assert scaling is not None and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0


def test_parameter_count_matches_the_model(tmp_path: Path) -> None:
    reference = _hf_checkpoint(tmp_path, "Qwen3ForCausalLM", {"head_dim": 32})
    expected = sum(p.numel() for p in reference.parameters())
    assert ModelConfig.from_hf(tmp_path).num_parameters == expected
