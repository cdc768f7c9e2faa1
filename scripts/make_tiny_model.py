"""A tiny random-weight Llama and a locally trained byte-level BPE tokenizer, with no
download: enough for real vLLM/SGLang to load, and deterministic under greedy decoding.

``--preset llama3-8b`` makes a random model of Llama-3-8B's geometry instead (32 layers,
hidden 4096, 8 KV heads of 128, bf16, built on the GPU): decoding it is bound by the GPU,
not by the engine's Python, which is what the overhead and co-location benchmarks need to
resolve small differences.

  python scripts/make_tiny_model.py DIR [--layers 2] [--hidden 128] [--preset llama3-8b]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


PRESETS = {  # name -> LlamaConfig geometry
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}


def make(
    out: Path, layers: int = 2, hidden: int = 128, vocab: int = 2048, seed: int = 0, preset: str | None = None
) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    geometry = (
        PRESETS[preset]
        if preset
        else dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    dtype = torch.bfloat16 if preset else torch.float32
    config = LlamaConfig(
        **geometry,
        vocab_size=max(vocab, tokenizer.get_vocab_size()),
        max_position_embeddings=8192 if preset else 2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    torch.manual_seed(seed)
    device = "cuda" if preset and torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: 8B in fp32 would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a real model's geometry, random weights")
    args = parser.parse_args()
    print(make(args.out, args.layers, args.hidden, preset=args.preset))


if __name__ == "__main__":
    main()
