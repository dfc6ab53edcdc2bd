"""Rendering a checked chat record with the chat template, and which of its tokens carry the loss.

The template is `data.chat_template` (a file or the template text) or the tokenizer's own. The loss mask:

* a template with `{% generation %}` markers says itself which text is the assistant's: HF's
  `apply_chat_template(..., return_assistant_tokens_mask=True)` is the mask, token for token;
* otherwise, for assistant turn i, `messages[:i]` rendered with the generation prompt is where the answer
  starts and `messages[: i + 1]` rendered (trailing whitespace aside) where it ends, both prefixes of the whole
  rendering. Every token overlapping such a span carries a label, as in HF's mask: a byte-level BPE merges the
  space before an answer into the answer's first token (" the"), which starts before the span and is the
  answer's all the same.

Templates that render earlier turns differently from the last (Qwen3-style: history without its reasoning)
break the prefix method for earlier turns. `assistant_loss: last` (the last turn is rendered as the last) and
`per_turn` (one sample per assistant turn, the conversation up to it, each turn rendered as the last) work
with them; `all` is refused saying so.

What a record holds is rendered as it is or refused by name, never dropped: tool calls the template ignores
(the conversation renders the same without them, or a function's name is not in the output) and text parts
whose text is not in the output are errors naming the message. A template that fails or runs longer than
`RENDER_SECONDS` on one record is an error naming the record; the bound interrupts Jinja's Python code from
a watchdog thread.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from pathlib import Path
from typing import Any

from engine.data.chat import Rendered

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
RENDER_SECONDS = 30.0  # per record: real conversations render in milliseconds


def resolve_template(spec: str | None) -> str | None:
    """`data.chat_template`: None (the tokenizer's), the text of a template file, or the template itself."""
    if spec is None or "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"data.chat_template: {spec!r} is neither a file nor a Jinja template (no {{{{ or {{%)"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.chat_template: {spec}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None


def use_template(tokenizer, spec: str | None) -> None:
    """Make `data.chat_template` the tokenizer's own, so that what is saved with the model (the export)
    renders conversations as training did."""
    template = resolve_template(spec)
    if template is not None:
        tokenizer.chat_template = template


def render_conversation(
    tokenizer, messages: list[dict], where: str, assistant_loss: str, template: str | None = None, **kw
) -> list[Rendered]:
    """The samples of one checked conversation: one, or (`per_turn`) one per assistant turn."""
    if assistant_loss != "per_turn":
        return [render_chat(tokenizer, messages, where, assistant_loss == "last", template, **kw)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [
        render_chat(tokenizer, messages[: i + 1], f"{where} (up to message {i})", True, template, **kw)
        for i in turns
    ]


def render_chat(
    tokenizer,
    messages: list[dict],
    where: str,
    last_only: bool,
    template: str | None = None,
    seconds: float = RENDER_SECONDS,
) -> Rendered:
    """One sample: the conversation's tokens, the loss on its assistant turns (`last_only`: the last)."""
    text = _template_text(tokenizer, template)

    def render(msgs: list[dict], prompt: bool = False) -> Any:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )

    def build() -> Rendered:
        full = render(messages)
        _check_rendered(messages, full, render, where)
        if GENERATION_MARKER.search(text):
            return _marked(tokenizer, messages, render, full, template, where, last_only)
        return _by_prefixes(tokenizer, messages, render, full, where, last_only)

    parts = [i for i, m in enumerate(messages) if isinstance(m.get("content"), list)]
    hint = (
        f" (messages[{parts[0]}].content is a list of parts: give it as a string, or use a template that "
        "renders parts, data.chat_template)"
        if parts
        else ""
    )
    return _within(seconds, build, where, hint)


def _template_text(tokenizer, template: str | None) -> str:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.tokenizer: has no chat template, which data.kind 'chat' renders records with "
            "(set data.chat_template)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "data.tokenizer: data.kind 'chat' needs a fast tokenizer (tokenizer.json) for offsets"
        )
    return tokenizer.get_chat_template(template)


def _marked(tokenizer, messages, render, full: str, template, where: str, last_only: bool) -> Rendered:
    """HF's own assistant mask from the template's {% generation %} blocks. The last assistant turn starts
    where the conversation before it, rendered with the generation prompt, ends (when that is a prefix of
    the whole, else at the last run of marked tokens): `last_only` keeps the marked tokens from there on,
    and left truncation keeps them whole."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    if not any(mask):
        raise ValueError(
            f"{where}: the chat template's {{% generation %}} blocks hold no token of the record"
        )
    first = max(t for t, m in enumerate(mask) if m)
    while first > 0 and mask[first - 1]:
        first -= 1
    turn = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    start = render(messages[:turn], prompt=True) if turn > 0 else None
    if start is not None and full.startswith(start):
        ends = [e for _, e in out["offset_mapping"]]
        first = next((t for t, m in enumerate(mask) if m and ends[t] > len(start)), first)
    if last_only:
        mask = [m and t >= first for t, m in enumerate(mask)]
    return Rendered(ids, mask, first, where)


def _by_prefixes(tokenizer, messages, render, full: str, where: str, last_only: bool) -> Rendered:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns[0] == 0:
        raise ValueError(
            f"{where}: the conversation starts with an assistant turn, whose prompt the chat template cannot "
            "render on its own; start with a system or user message (or use a template with "
            "{% generation %} markers)"
        )
    spans, broken = [], []
    for i in turns[-1:] if last_only else turns:
        start, end = render(messages[:i], prompt=True), render(messages[: i + 1])
        if full.startswith(start) and full.startswith(end) and len(start) <= len(end.rstrip()):
            spans.append((len(start), len(end.rstrip())))
        else:
            broken.append(i)
    if broken:
        raise ValueError(_prefix_error(where, broken[0], turns, last_only))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    loss = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    if not any(loss):
        raise ValueError(
            f"{where}: the chat template renders no text for the assistant turn(s): nothing to train on"
        )
    first = next(t for t, (_, e) in enumerate(offsets) if e > spans[-1][0])
    return Rendered(list(enc["input_ids"]), loss, first, where)


def _prefix_error(where: str, i: int, turns: list[int], last_only: bool) -> str:
    what = (
        f"{where}: the chat template renders the conversation up to message {i} differently inside the "
        "whole conversation (it re-renders earlier turns, as Qwen3-style templates do), so that turn's "
        "tokens cannot be located"
    )
    if not last_only and i != turns[-1]:
        return (
            f"{what}; use data.assistant_loss 'last' (loss on the last assistant turn) or 'per_turn' (one "
            "sample per assistant turn, each rendered as the last), or a template with {% generation %} "
            "markers (data.chat_template)"
        )
    return f"{what}; use a template with {{% generation %}} markers (data.chat_template)"


def _check_rendered(messages: list[dict], full: str, render, where: str) -> None:
    """Refuse what the template left out: tool calls and content parts are not rendered by every template.
    A message's tool calls count as rendered when the conversation without them renders differently and
    each function's name is in the output."""
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if calls:
            without = [*messages[:i], {k: v for k, v in m.items() if k != "tool_calls"}, *messages[i + 1 :]]
            try:
                ignored = render(without) == full
            except Exception:  # the template needs them to render the message at all: they are rendered
                ignored = False
            for j, call in enumerate(calls):
                name = call["function"]["name"]
                if ignored or name not in full:
                    raise ValueError(
                        f"{where}: messages[{i}].tool_calls[{j}]: the chat template does not render tool "
                        f"calls (function {name!r} is not in its output); use a template that does "
                        "(data.chat_template)"
                    )
        if isinstance(m.get("content"), list):
            for j, part in enumerate(m["content"]):
                if part["text"].strip() not in full:
                    raise ValueError(
                        f"{where}: messages[{i}].content[{j}]: the chat template does not render content given "
                        "as a list of parts (its text is not in the output); give content as a string or use a "
                        "template that renders parts (data.chat_template)"
                    )


class _RenderTimeout(BaseException):  # not an Exception: no `except Exception` in Jinja or HF swallows it
    pass


class _Watchdog:
    """One daemon thread for every bounded render: a thread arms a deadline, and the watchdog raises
    _RenderTimeout in it at its next bytecode if the deadline passes before it disarms (Jinja runs Python
    code, so the exception lands; nothing process-wide changes). Firing and disarming take the same lock, so
    once `disarm` returns no exception can follow."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}  # thread id -> time.monotonic() deadline
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="chat-template-watchdog", daemon=True)
                self._thread.start()
            self._deadlines[threading.get_ident()] = time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadlines.pop(threading.get_ident(), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident in [i for i, d in self._deadlines.items() if d <= now]:
                    del self._deadlines[ident]
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(ident), ctypes.py_object(_RenderTimeout)
                    )
                self._cond.wait(min(self._deadlines.values(), default=now + 3600) - now)


_WATCHDOG = _Watchdog()


def _within(seconds: float, fn, where: str, hint: str = ""):
    """fn() bounded in time (_Watchdog); a template's own error or an overrun is a ValueError naming the
    record."""
    try:
        try:
            _WATCHDOG.arm(seconds)
            return fn()
        finally:
            _WATCHDOG.disarm()
    except _RenderTimeout:
        raise ValueError(
            f"{where}: rendering the chat template took longer than {seconds:g} s; the template loops "
            "without end or is far too slow (check data.chat_template / the tokenizer's template)"
        ) from None
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:  # the template's own failure (raise_exception, undefined names, recursion)
        raise ValueError(f"{where}: the chat template failed: {type(e).__name__}: {e}{hint}") from None
