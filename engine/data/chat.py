"""Chat and prompt/completion records (read by engine/data/readers.py): validation, and rendering into tokens with a loss mask.

A chat record is rendered by its chat template (engine/data/chat_render.py, which also finds the
loss-bearing tokens). Messages keep what they hold: an assistant's `tool_calls`, a tool turn's
`tool_call_id` / `name`, content as a string or a list of text parts; any other key is refused by name.

Every record is validated (missing or unknown role, empty or malformed content, unknown keys, no assistant turn,
missing fields) before anything is tokenized, with an error naming the file, line and field: it surfaces at config
load, before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# What a message may hold besides role and content, by role: everything else is refused by name (a chat
# template sees the whole message; a key it would ignore is a key the run would silently not train on).
EXTRA_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}


def check_chat(record: Any, where: str, field: str) -> list[dict[str, Any]]:
    """The record's messages as given (role, content, and an assistant's `tool_calls`, a tool turn's
    `tool_call_id` / `name`; content a string or a list of text parts), or a ValueError naming the record
    and the field."""
    if not isinstance(record, dict) or field not in record:
        raise ValueError(
            f"{where}: no field {field!r} (data.messages_field) in the record{layout_hint(record)}"
        )
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {field} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        _check_message(m, f"{where}: {field}[{i}]")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: {field} has no assistant turn, so the sample would carry no loss")
    return [dict(m) for m in messages]


# A record's fields that say which layout it is in, and the setting that reads that layout.
_LAYOUTS = (
    (("conversations",), "data.chat_format: sharegpt"),
    (("messages",), "data.kind: chat (data.chat_format: messages)"),
    (("prompt", "completion"), "data.kind: prompt_completion"),
)


def layout_hint(record: Any) -> str:
    """The record's fields and, where they are a known layout, the setting that reads it (for a missing-field
    error: the field asked for is usually right for another layout)."""
    if not isinstance(record, dict):
        return ""
    fields = sorted(k for k, v in record.items() if v is not None)
    known = [setting for keys, setting in _LAYOUTS if all(k in fields for k in keys)]
    return f"; its fields are {fields}" + (f" (as {known[0]} reads)" if known else "")


def _check_message(m: Any, at: str) -> None:
    if not isinstance(m, dict):
        raise ValueError(f"{at}: must be an object with role and content, got {type(m).__name__}")
    if "role" not in m:
        raise ValueError(f"{at}.role: missing")
    role = m["role"]
    if role not in ROLES:
        raise ValueError(f"{at}.role: {role!r} is not one of {ROLES}")
    allowed = ("role", "content", *EXTRA_KEYS.get(role, ()))
    for key in m:
        if key not in allowed:
            raise ValueError(f"{at}.{key}: not a key of a {role!r} message (allowed: {', '.join(allowed)})")
    calls = m.get("tool_calls")
    if calls is not None:
        _check_tool_calls(calls, f"{at}.tool_calls")
    if "content" not in m:
        if calls:  # an assistant turn that only calls tools
            return
        raise ValueError(f"{at}.content: missing")
    content = m["content"]
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, f"{at}.content[{j}]")
    elif content is None and calls:
        return
    elif not isinstance(content, str):
        raise ValueError(
            f"{at}.content: must be a string or a list of text parts, got {type(content).__name__}"
        )
    if not calls and not _text_of(content).strip():
        raise ValueError(f"{at}.content: empty")


def _check_part(part: Any, at: str) -> None:
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"{at}: a content part must be an object with a type, got {_SHORT(part)}")
    if part["type"] != "text":
        raise ValueError(
            f"{at}.type: {part['type']!r} parts are not supported (data.kind chat trains on text)"
        )
    extra = sorted(set(part) - {"type", "text"})
    if extra:
        raise ValueError(f"{at}.{extra[0]}: not a key of a text part (allowed: type, text)")
    if not isinstance(part.get("text"), str):
        raise ValueError(f"{at}.text: must be a string")


def _check_tool_calls(calls: Any, at: str) -> None:
    if not isinstance(calls, list):
        raise ValueError(f"{at}: must be a list of tool calls, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ValueError(
                f"{at}[{j}].function.name: missing (a tool call is {{function: {{name, arguments}}}})"
            )
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            raise ValueError(f"{at}[{j}].function.arguments: must be an object or a JSON string")


def _text_of(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def _SHORT(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_prompt_completion(
    record: Any, where: str, prompt_field: str, completion_field: str
) -> tuple[str, str]:
    out = []
    for name, key in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
        if not isinstance(record, dict) or name not in record:
            raise ValueError(f"{where}: no field {name!r} ({key}) in the record{layout_hint(record)}")
        value = record[name]
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{where}: {name} is empty")
        out.append(value)
    return out[0], out[1]


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
