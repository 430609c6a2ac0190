"""The embedded default model, `tiny`: built by the project on first use, offline.

A byte-level BPE tokenizer trained on a generated corpus and a small Llama with seeded random
weights, saved as a real Hugging Face checkpoint (config.json, model.safetensors, tokenizer
files), then loaded through the normal loader like any other checkpoint. The same inputs give
byte-identical files on every machine, so results on `tiny` compare across runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from runtime.model_names import ARCHITECTURES_DIR

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / ".models"
SEED = 0
VOCAB_SIZE = 2048
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a model server token request batch cache block queue user answer question time fast "
    "slow memory latency throughput prompt output input engine layer head weight value key "
    "first last next every each many few more less long short good bad new old small large "
    "is are was were has have can will should must may run runs serve serves wait waits read "
    "write send sends stream streams load loads measure measures compare compares and or but "
    "if when while because so then than of to in on at by for with from into over under"
).split()


def _corpus(lines: int = 4000) -> list[str]:
    rng = random.Random(SEED)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        number = f" {rng.randint(0, 9999)}" if rng.random() < 0.3 else ""
        out.append(" ".join(words).capitalize() + number + rng.choice([".", "?", "!", ","]))
    return out


def _build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=SPECIAL[0],
        pad_token=SPECIAL[0],
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)


def _build_weights(path: Path, vocab_size: int, eos_token_id: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # The shape lives with the other named architectures; the vocabulary is the tokenizer's.
    shape = json.loads((ARCHITECTURES_DIR / "tiny.json").read_text())
    del shape["architectures"]
    config = LlamaConfig(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=None,
                         **shape)  # fmt: skip
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)


def ensure_tiny(root: Path | None = None) -> Path:
    """The tiny checkpoint's directory, built first if missing (atomically: a crash midway
    never leaves half a model behind)."""
    target = (root or DEFAULT_ROOT) / "tiny"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        _build_tokenizer(staging)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(staging, local_files_only=True)
        _build_weights(staging, len(tok), tok.eos_token_id)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same build first: use theirs
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target
