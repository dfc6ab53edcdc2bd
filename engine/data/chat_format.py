"""Chat records as users store them, mapped onto the {role, content} messages the chat template renders.

``data.chat_format`` names the layout (``messages``: {role, content}; ``sharegpt``: {from, value} with
human / gpt / system / tool), ``data.chat_keys`` and ``data.chat_roles`` adjust it. Keys whose value is null
are left out of each message: Arrow-backed formats (parquet, save_to_disk) store a message as a struct of
every key any message has, so a key one message lacks reads as null there; leaving them out makes every
format render like the jsonl it came from.
"""

from __future__ import annotations

from typing import Any

_FORMATS: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    # chat_format: (default field, {role/content -> message key}, role renames)
    "messages": ("messages", {"role": "role", "content": "content"}, {}),
    "sharegpt": (
        "conversations",
        {"role": "from", "content": "value"},
        {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool", "user": "user"},
    ),
}


def messages_field(chat_format: str, field: str | None) -> str:
    """The record field holding the conversation."""
    return field if field is not None else _FORMATS[chat_format][0]


def to_messages(
    record: Any, field: str, chat_format: str, keys: dict[str, str] | None, roles: dict[str, str] | None
) -> Any:
    """``record`` with its conversation under ``field`` rewritten as {role, content, ...} messages.

    Only the layout changes: anything that is not what was expected (not a dict, no such field, not a list
    of dicts) is passed through for the validation to name precisely.
    """
    _, default_keys, default_roles = _FORMATS[chat_format]
    keys = {**default_keys, **(keys or {})}
    roles = {**default_roles, **(roles or {})}
    if not isinstance(record, dict) or not isinstance(record.get(field), list):
        return record
    out = []
    for m in record[field]:
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = {k: v for k, v in m.items() if v is not None}
        renamed = {k: v for k, v in m.items() if k not in (keys["role"], keys["content"])}
        if keys["role"] in m:
            role = m[keys["role"]]
            renamed["role"] = roles.get(role, role) if isinstance(role, str) else role
        if keys["content"] in m:
            renamed["content"] = m[keys["content"]]
        out.append(renamed)
    return {**record, field: out}
