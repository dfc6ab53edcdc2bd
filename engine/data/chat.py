"""Chat and prompt/completion records: reading, validation, and rendering into tokens with a loss mask.

A chat record is rendered by the tokenizer's own chat template; the loss-bearing tokens are found without
knowing the template: for assistant turn i, the text of `messages[:i]` rendered with the generation prompt
is where the answer starts, and `messages[: i + 1]` rendered (trailing whitespace aside) is where it ends,
both prefixes of the whole rendering. Tokens whose first character falls inside such a span carry labels
(the answer and the template's end-of-turn marker). A template that does not render prefixes as prefixes
(some strip earlier turns' reasoning) cannot be masked this way and is refused with that reason.

Every record is validated (missing or unknown role, empty or non-string content, no assistant turn, missing
fields) before anything is tokenized, with an error naming the file, line and field: it surfaces at config
load, before any process group starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rendered:
    """One sample: token ids, which of them carry the loss, and where the last answer starts."""

    ids: list[int]
    loss: list[bool]
    answer_start: int  # first token of the last loss-bearing span (what left truncation must keep)
    where: str  # file and line, for messages
    truncated: int = 0  # tokens dropped from the left


def read_records(path: str) -> list[tuple[str, Any]]:
    """(where, record) of every non-blank line of the jsonl file `path`, or of the *.jsonl files of the
    directory `path` in name order."""
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"data.path: {path!r} is neither a .jsonl file nor a directory of .jsonl files")
    records = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{f}, line {lineno}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise ValueError(f"data.path: {path!r} holds no records")
    return records


def check_chat(record: Any, where: str, field: str) -> list[dict[str, str]]:
    """The record's messages, or a ValueError naming the record and the field."""
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where}: no field {field!r} (data.messages_field) in the record")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {field} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at}: must be an object with role and content, got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"{at}.role: missing")
        if m["role"] not in ROLES:
            raise ValueError(f"{at}.role: {m['role']!r} is not one of {ROLES}")
        if "content" not in m:
            raise ValueError(f"{at}.content: missing")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}.content: must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ValueError(f"{at}.content: empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: {field} has no assistant turn, so the sample would carry no loss")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_prompt_completion(
    record: Any, where: str, prompt_field: str, completion_field: str
) -> tuple[str, str]:
    out = []
    for name, key in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
        if not isinstance(record, dict) or name not in record:
            raise ValueError(f"{where}: no field {name!r} ({key}) in the record")
        value = record[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: {name} is empty")
        out.append(value)
    return out[0], out[1]


def render_chat(tokenizer, messages: list[dict[str, str]], where: str, last_only: bool) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.tokenizer: has no chat template, which data.kind 'chat' renders records with")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "data.tokenizer: data.kind 'chat' needs a fast tokenizer (tokenizer.json) for offsets"
        )

    def render(msgs, prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    full = render(messages)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if last_only else turns:
        start, end = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end.rstrip())):
            raise ValueError(
                f"{where}: the tokenizer's chat template does not render the conversation up to message {i} "
                "as a prefix of the whole conversation, so the assistant tokens cannot be located"
            )
        spans.append((len(start), len(end.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    loss = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    first = next(t for t, (s, _) in enumerate(enc["offset_mapping"]) if s >= spans[-1][0])
    return Rendered(list(enc["input_ids"]), loss, first, where)


def render_prompt_completion(tokenizer, prompt: str, completion: str, where: str) -> Rendered:
    """bos (if the tokenizer has one) + prompt + completion + eos; the loss on the completion and eos."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = ([bos] if bos is not None else []) + list(tokenizer.encode(prompt, add_special_tokens=False))
    tail = list(tokenizer.encode(completion, add_special_tokens=False)) + ([eos] if eos is not None else [])
    return Rendered(head + tail, [False] * len(head) + [True] * len(tail), len(head), where)


def fit(sample: Rendered, seq_len: int, truncation: str) -> Rendered | None:
    """The sample within `seq_len` tokens per `data.truncation`; None when it is to be dropped."""
    n = len(sample.ids)
    if n <= seq_len:
        return sample
    if truncation == "error":
        raise ValueError(
            f"{sample.where}: {n} tokens, more than data.seq_len {seq_len} (data.truncation: error)"
        )
    if truncation == "drop":
        return None
    answer = n - sample.answer_start
    if answer > seq_len:
        raise ValueError(
            f"{sample.where}: the answer alone is {answer} tokens, more than data.seq_len {seq_len}; "
            "data.truncation 'left' drops context, never the answer (raise seq_len or use truncation 'drop')"
        )
    cut = n - seq_len
    return Rendered(sample.ids[cut:], sample.loss[cut:], sample.answer_start - cut, sample.where, cut)
