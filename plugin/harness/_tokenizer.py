"""A small byte-level BPE tokenizer built locally (no model hub), shared by all tiny models.

Ids 0..3 are special tokens, ids 4..259 the 256 byte symbols, and the rest BPE merges trained on a
synthetic, seeded corpus, so the vocabulary always fills exactly ``vocab_size`` ids and every id a
random-weight model can sample decodes to text.
"""

from __future__ import annotations

import json
import pathlib
import random

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
EOS_TOKEN_ID = 0  # <|endoftext|>
BOS_TOKEN_ID = 1  # <|im_start|>
IM_END_TOKEN_ID = 2
PAD_TOKEN_ID = 3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SEED_TEXT = (
    "the of and to in is that for it as with was on be by at this are from or an which have "
    "expert experts token tokens router routing layer layers model models memory bandwidth "
    "cache reuse batch decode prefill kernel weight weights hidden state attention mixture "
    "sparse dense server request prompt completion metric counter latency throughput gpu cpu "
    "byte bytes"
)
_SEED_WORDS = _SEED_TEXT.split()


def _corpus(seed: int = 0, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    out = []
    for _ in range(lines):
        words = []
        for _ in range(12):
            if rng.random() < 0.6:
                words.append(rng.choice(_SEED_WORDS))
            else:
                n = rng.randint(2, 7)
                words.append("".join(rng.choices(letters, weights=weights, k=n)))
        out.append(
            " ".join(words) + rng.choice([".", ",", "?", "!", ""]) + " " + str(rng.randint(0, 999))
        )
    return out


def build_tokenizer(out_dir: pathlib.Path, vocab_size: int, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS[EOS_TOKEN_ID],
        "pad_token": SPECIAL_TOKENS[PAD_TOKEN_ID],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIAL_TOKENS)
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": SPECIAL_TOKENS[EOS_TOKEN_ID], "pad_token": SPECIAL_TOKENS[PAD_TOKEN_ID]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
