"""Rebuild the tiny shipped tokenizer (tokenizer/): byte-level BPE trained with `tokenizers` on the shipped
SFT data, a ChatML chat template whose assistant turns carry {% generation %} markers (so HF's own
`return_assistant_tokens_mask` gives the tests an independent reference for the loss mask). Deterministic;
nothing is downloaded. Run: python tests/data/sft/make_tokenizer.py"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus() -> list[str]:
    texts = []
    for line in (HERE / "chat.jsonl").read_text().splitlines():
        texts += [f"{m['role']}\n{m['content']}" for m in json.loads(line)["messages"]]
    for line in (HERE / "prompt_completion.jsonl").read_text().splitlines():
        r = json.loads(line)
        texts.append(r["prompt"] + r["completion"])
    return texts


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(HERE / "tokenizer"))


if __name__ == "__main__":
    main()
