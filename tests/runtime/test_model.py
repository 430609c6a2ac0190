"""Our Llama-family model against transformers on the same weights, and over the paged cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from runtime.config import ModelConfig, named_architecture
from runtime.layers.attention import AttentionMetadata, TorchAttention
from runtime.loader import load_checkpoint, load_dummy
from runtime.models.llama import LlamaForCausalLM

TOLERANCE = 1e-4  # max abs logit difference, float32 on CPU
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
BLOCK = 4


def _hf_checkpoint(tmp: Path, arch: str, **extra: object) -> tuple[Path, torch.nn.Module]:
    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[arch]
    torch.manual_seed(0)
    config = config_cls(**SHAPE, **extra)
    model = getattr(transformers, arch)(config).eval()
    model.save_pretrained(tmp)
    return tmp, model


def _ours(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_hf(path), TorchAttention()).eval()
    load_checkpoint(model, path)
    return model


def _prefill(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits for every position of one sequence, prefilled at once."""
    cfg = model.config
    blocks = -(-len(tokens) // BLOCK)
    cache = [torch.zeros(2, blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
             for _ in range(cfg.num_hidden_layers)]  # fmt: skip
    meta = AttentionMetadata(
        slot_mapping=torch.arange(len(tokens)),
        query_start_loc=torch.tensor([0, len(tokens)]),
        context_lens=torch.tensor([len(tokens)]),
        block_tables=torch.arange(blocks).unsqueeze(0),
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), cache, meta)
        return model.compute_logits(hidden)


PROMPT = [5, 17, 99, 3, 250, 42, 7, 7, 128, 64, 1, 300]


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("LlamaForCausalLM", {}),
        ("LlamaForCausalLM", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
        ("Qwen2ForCausalLM", {}),
        ("Qwen3ForCausalLM", {"head_dim": 32}),
    ],
    ids=["llama", "llama3-rope-tied", "qwen2-bias", "qwen3-qk-norm"],
)
def test_logits_match_transformers(tmp_path: Path, arch: str, extra: dict[str, object]) -> None:
    path, reference = _hf_checkpoint(tmp_path, arch, **extra)
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    got = _prefill(_ours(path), PROMPT)
    assert (got - expected).abs().max().item() < TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_dummy_weights_depend_only_on_seed_and_name() -> None:
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **SHAPE})
    a, b, c = (LlamaForCausalLM(cfg, TorchAttention()) for _ in range(3))
    load_dummy(a, seed=1), load_dummy(b, seed=1), load_dummy(c, seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])
    assert torch.equal(pa["model.norm.weight"], torch.ones(SHAPE["hidden_size"]))


@pytest.mark.parametrize(
    "name,billions", [("llama-3-8b", 8.03), ("qwen3-0.6b", 0.596), ("small", 0.056)]
)
def test_named_architectures_have_their_real_shapes(name: str, billions: float) -> None:
    path = named_architecture(name)
    assert path is not None
    assert ModelConfig.from_hf(path).num_parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_parameter_count_matches_the_model(tmp_path: Path) -> None:
    path, reference = _hf_checkpoint(tmp_path, "Qwen3ForCausalLM", head_dim=32)
    expected = sum(p.numel() for p in reference.parameters())
    assert ModelConfig.from_hf(path).num_parameters == expected
