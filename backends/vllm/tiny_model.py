"""Build a tiny, randomly initialised Llama model and a locally trained tokenizer (no network).

Run it with the vLLM virtualenv's Python (it needs ``torch``, ``transformers`` and
``tokenizers``, which vLLM brings)::

    ~/.cache/vtc-vllm/venv-0.32.0/bin/python backends/vllm/tiny_model.py OUT_DIR \
        [--hidden 128 --layers 2 --vocab 2048 --context 2048 --seed 0]

``OUT_DIR`` then holds ``config.json``, ``model.safetensors`` and the tokenizer files (with a
chat template), which ``vllm serve OUT_DIR`` loads. The output is deterministic for a given set
of arguments, and the folder is reused when a complete build with the same arguments is there.
Its text is gibberish (random weights); what matters for the gateway is that the engine does
real work: real tokenizer, real KV cache, real scheduling. ``--hidden 1024 --layers 8`` makes
vLLM the bottleneck on a small CPU (about 650 tokens/s for 8 streams).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORDS = [
    "the",
    "a",
    "gateway",
    "fair",
    "share",
    "token",
    "counter",
    "tenant",
    "queue",
    "request",
    "model",
    "stream",
    "batch",
    "backend",
    "server",
    "client",
    "prompt",
    "output",
    "input",
    "cache",
    "block",
    "scheduler",
    "admission",
    "weight",
    "service",
    "latency",
    "time",
    "first",
    "last",
    "next",
    "every",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hello",
    "world",
    "user",
    "assistant",
    "system",
    "answer",
    "question",
    "write",
    "tell",
    "story",
    "about",
    "why",
    "how",
    "what",
    "when",
    "where",
]
STAMP = "vtc-tiny-model.json"


def corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice(".!?,;:"))
    return lines


def build(out: Path, hidden: int, layers: int, vocab: int, context: int, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=context,
    )
    fast.chat_template = CHAT_TEMPLATE
    heads = max(2, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=context,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = {k: getattr(a, k) for k in ("hidden", "layers", "vocab", "context", "seed")}
    stamp = a.out / STAMP
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # one build of a folder at a time (test runs may share the cache); readers wait for it
    with open(a.out.parent / f".{a.out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
            build(a.out, **spec)
            stamp.write_text(json.dumps(spec))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
