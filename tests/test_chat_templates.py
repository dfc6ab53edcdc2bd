"""Chat templates and what records hold: loss masks token for token against HF's assistant mask.

The reference is always HF's `apply_chat_template(..., return_assistant_tokens_mask=True)` on a version of
the template with {% generation %} markers around each assistant turn; the engine's masks come from the
template without markers (the prefix method) or with them (HF's mask itself). The tokenizer is a byte-level
BPE trained here on the records, so answers' first words merge with the space before them (" the"), the
case a mask starting at the answer's first character misses.
"""

from __future__ import annotations

import json

import pytest
from tiny import hf_assistant_mask
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.config import DataConfig
from engine.data import build_dataset
from engine.data.chat import check_chat
from engine.data.chat_render import render_chat, render_conversation, resolve_template

USER, ASSISTANT = {"role": "user"}, {"role": "assistant"}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = [
    [{**USER, "content": "Name the colour of the sky."}, {**ASSISTANT, "content": "the sky is blue."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {**USER, "content": "Capital of France?"},
        {**ASSISTANT, "content": "the capital is Paris."},
        {**USER, "content": "And of Italy?"},
        {**ASSISTANT, "content": "the capital is Rome."},
    ],
    [
        {**USER, "content": "Weather in Paris?"},
        {**ASSISTANT, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
        {**ASSISTANT, "content": "the weather is sunny."},
    ],
    [
        {
            **USER,
            "content": [{"type": "text", "text": "Two parts: "}, {"type": "text", "text": "add 2 and 3."}],
        },
        {**ASSISTANT, "content": [{"type": "text", "text": "the sum is 5."}]},
    ],
]

# One template, three ways: plain (no markers), with {% generation %} markers, and Qwen3-style (the last
# assistant turn after the last user message is rendered with a think block, history turns without).
BODY = (
    "{%- if m.content is string %}{{ m.content }}{%- elif m.content %}"
    "{%- for p in m.content %}{{ p.text }}{%- endfor %}{%- endif %}"
    "{%- for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{%- endfor %}"
)
PLAIN = (
    "{%- for m in messages %}{{ m.role + ': ' }}" + BODY + "{{ '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)
MARKED = (
    "{%- for m in messages %}{{ m.role + ': ' }}{%- if m.role == 'assistant' %}{% generation %}"
    + BODY
    + "{{ '<|end|>' }}{% endgeneration %}{%- else %}"
    + BODY
    + "{{ '<|end|>' }}{%- endif %}{{ '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)


def qwen3_style(marked: bool) -> str:
    gen, end = ("{% generation %}", "{% endgeneration %}") if marked else ("", "")
    return (
        "{%- set ns = namespace(last_query=-1) %}"
        "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
        "{%- endfor %}"
        "{%- for m in messages %}{{ m.role + ': ' }}"
        "{%- if m.role == 'assistant' %}" + gen + "{%- if loop.index0 > ns.last_query %}<think></think> "
        "{%- endif %}" + BODY + "{{ '<|end|>' }}" + end + "{%- else %}" + BODY + "{{ '<|end|>' }}{%- endif %}"
        "{{ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
    )


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE trained on the rendered records: ' the', ' capital' ... become single tokens."""
    texts = [MARKED_TOK.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|end|>", chat_template=PLAIN
    )
    assert len(fast.tokenize(" the")) == 1  # the merge the prefix-length method stumbles on
    return fast


MARKED_TOK = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.BPE()), eos_token="<|end|>", chat_template=MARKED
)  # renders text only (for the corpus)


def hf_mask(tok, messages, template, last_only=False):
    return hf_assistant_mask(tok, messages, last_only, chat_template=template)


@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("template", ["plain", "marked"])
def test_masks_equal_hfs_assistant_mask(tok, template, last_only):
    """Tool calls, tool turns and content parts included; the first answer token (' the') is labelled."""
    for i, conv in enumerate(CONVERSATIONS):
        messages = check_chat({"messages": conv}, f"record {i}", "messages")
        got = render_chat(tok, messages, f"record {i}", last_only, PLAIN if template == "plain" else MARKED)
        ids, mask = hf_mask(tok, messages, MARKED, last_only)
        assert got.ids == ids
        assert got.loss == mask, (i, [tok.decode([t]) for t, m in zip(ids, got.loss) if m])
        assert got.answer_start == max(t for t, m in enumerate(mask) if m and not mask[t - 1])
    # the records' tool call is trained on (it is the assistant's), the tool's answer is not
    got = render_chat(tok, check_chat({"messages": CONVERSATIONS[2]}, "r", "messages"), "r", False, PLAIN)
    labelled = tok.decode([t for t, m in zip(got.ids, got.loss) if m])
    assert "get_weather" in labelled and "sunny, 21 C" not in labelled


def test_prefix_method_labels_the_merged_first_token(tok):
    """Negative control: the first token of the answer starts at the space before it; a mask that starts at
    the answer's first character (the method this replaces) leaves it out."""
    messages = CONVERSATIONS[0]
    got = render_chat(tok, messages, "r", False, PLAIN)
    first = got.answer_start
    assert tok.decode([got.ids[first]]) == " the" and got.loss[first]
    start = len(
        tok.apply_chat_template(messages[:1], chat_template=PLAIN, tokenize=False, add_generation_prompt=True)
    )
    offsets = tok(
        tok.apply_chat_template(messages, chat_template=PLAIN, tokenize=False), return_offsets_mapping=True
    )
    assert offsets["offset_mapping"][first][0] < start  # so "first character inside the span" misses it


def test_templates_that_ignore_what_records_hold_are_refused_by_name(tok):
    """The shipped-style ChatML template renders neither tool calls nor parts: refused, never dropped."""
    chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    calls = check_chat({"messages": CONVERSATIONS[2]}, "r", "messages")
    calls[1]["content"] = "calling"
    with pytest.raises(
        ValueError, match=r"r: messages\[1\]\.tool_calls\[0\]: the chat template does not render"
    ):
        render_chat(tok, calls, "r", False, chatml)
    parts = check_chat({"messages": CONVERSATIONS[3]}, "r", "messages")
    with pytest.raises(ValueError, match=r"r: .*(content|TypeError)"):
        render_chat(tok, parts, "r", False, chatml)
    drops = PLAIN.replace("{%- for p in m.content %}{{ p.text }}{%- endfor %}", "")
    with pytest.raises(
        ValueError, match=r"r: messages\[0\]\.content\[0\]: the chat template does not render"
    ):
        render_chat(tok, parts, "r", False, drops)


def test_qwen3_style_template(tok):
    """History re-rendered: `all` is refused naming what works; `last` and `per_turn` equal HF's mask."""
    plain, marked = qwen3_style(False), qwen3_style(True)
    conv = CONVERSATIONS[1]
    with pytest.raises(
        ValueError, match=r"message 2 differently .* use data\.assistant_loss 'last' .* 'per_turn'"
    ):
        render_conversation(tok, conv, "r", "all", plain)
    [last] = render_conversation(tok, conv, "r", "last", plain)
    assert (last.ids, last.loss) == hf_mask(tok, conv, marked, last_only=True)
    turns = render_conversation(tok, conv, "r", "per_turn", plain)
    assert [t.where for t in turns] == ["r (up to message 2)", "r (up to message 4)"]
    for sample, upto in zip(turns, (3, 5)):
        assert (sample.ids, sample.loss) == hf_mask(tok, conv[:upto], marked, last_only=True)
    # with generation markers, `all` works with the same template family: HF's mask itself
    [marked_all] = render_conversation(tok, conv, "r", "all", marked)
    assert (marked_all.ids, marked_all.loss) == hf_mask(tok, conv, marked)


def test_data_chat_template_file_or_text_through_the_dataset(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    (tmp_path / "marked.jinja").write_text(MARKED)
    from engine.data import load_tokenizer

    loaded = load_tokenizer(str(tmp_path / "tok"))
    for spec in (str(tmp_path / "marked.jinja"), MARKED):
        assert resolve_template(spec) == MARKED
        cfg = DataConfig(
            kind="chat", path=str(data), tokenizer=str(tmp_path / "tok"), seq_len=256, packing=False
        )
        cfg.chat_template = spec
        ds = build_dataset(cfg, loaded)
        for i, conv in enumerate(CONVERSATIONS):
            ids, mask = hf_mask(tok, conv, MARKED)
            assert ds[i]["labels"][: len(ids)].tolist() == [t if m else -100 for t, m in zip(ids, mask)]
    with pytest.raises(
        ValueError, match="data.chat_template: 'nope.jinja' is neither a file nor a Jinja template"
    ):
        resolve_template("nope.jinja")


@pytest.mark.parametrize(
    "template,needle",
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "rendering the chat template took longer than 0.5 s",
        ),
        (
            "{{ raise_exception('no system role') }}",
            "the chat template failed: TemplateError: no system role",
        ),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template failed: RecursionError"),
    ],
    ids=["endless", "raises", "recursion"],
)
def test_hostile_template_is_one_error_naming_the_record(tok, template, needle):
    messages = check_chat({"messages": CONVERSATIONS[0]}, "r", "messages")
    with pytest.raises(ValueError, match=f"^data.jsonl, line 3: {needle}"):
        render_chat(tok, messages, "data.jsonl, line 3", False, template, seconds=0.5)


def test_template_that_renders_no_answer_is_refused(tok):
    """Nothing of the assistant turn in the output: the sample would carry no loss; refused by name."""
    silent = (
        "{%- for m in messages %}{{ m.role + ':' }}{%- if m.role != 'assistant' %}{{ m.content }}{%- endif %}"
        "{{ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ 'assistant:' }}{%- endif %}"
    )
    with pytest.raises(ValueError, match="r: the chat template renders no text for the assistant turn"):
        render_chat(tok, CONVERSATIONS[0], "r", False, silent)


def test_sft_pad_id_is_part_of_the_vocabulary_check(tok, tmp_path):
    """A pad token added above the model's vocabulary (every sample's ids below it): the padded rows would
    index past the embedding (a device-side assert on GPU); refused naming the pad id."""
    from engine.data import check_vocab
    from engine.data.sft import SftDataset

    padded = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, eos_token="<|end|>", chat_template=PLAIN
    )
    padded.add_special_tokens({"pad_token": "<xpad>"})
    vocab = len(tok)
    assert padded.pad_token_id == vocab
    samples = [render_chat(padded, c, f"r{i}", False) for i, c in enumerate(CONVERSATIONS)]
    assert max(max(s.ids) for s in samples) < vocab
    ds = SftDataset(samples, 256, padded.pad_token_id, packing=False, source="chat.jsonl")
    with pytest.raises(
        ValueError, match=rf"chat.jsonl: token id {vocab} \(the pad id: .*\) is outside the model vocab"
    ):
        check_vocab(ds, vocab)
    check_vocab(ds, vocab + 1)
    full = SftDataset(
        samples[:1], len(samples[0].ids), padded.pad_token_id, packing=False, source="chat.jsonl"
    )
    check_vocab(full, vocab)  # no row padded: the pad id never reaches the model


def test_last_turn_in_several_generation_blocks_is_kept_whole(tok):
    """A template marking an assistant turn's content and its tool calls as two generation blocks: `last`
    keeps both (the turn starts where the conversation before it ends), not just the last block."""
    two_blocks = MARKED.replace(
        "{% generation %}" + BODY + "{{ '<|end|>' }}{% endgeneration %}",
        "{% generation %}{{ m.content or '' }}{% endgeneration %} | "
        "{% generation %}{%- for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{%- endfor %}"
        "{{ '<|end|>' }}{% endgeneration %}",
    )
    assert two_blocks != MARKED
    conv = [
        {**USER, "content": "Weather and time?"},
        {**ASSISTANT, "content": "the weather first.", "tool_calls": [CALL]},
    ]
    got = render_chat(tok, check_chat({"messages": conv}, "r", "messages"), "r", True, two_blocks)
    _, every = hf_mask(tok, conv, two_blocks)
    assert got.loss == every  # one assistant turn: last == all, both blocks
    labelled = tok.decode([t for t, m in zip(got.ids, got.loss) if m])
    assert "the weather first." in labelled and "get_weather" in labelled
    assert got.answer_start == every.index(True)


def test_data_chat_template_becomes_the_tokenizers_own(tok, tmp_path):
    """The trainer hands the template to the tokenizer it exports with the model: inference renders as
    training did."""
    from engine.data.chat_render import use_template

    tok.save_pretrained(tmp_path / "tok")
    from engine.data import load_tokenizer

    loaded = load_tokenizer(str(tmp_path / "tok"))
    use_template(loaded, None)
    assert loaded.chat_template == PLAIN
    (tmp_path / "marked.jinja").write_text(MARKED)
    use_template(loaded, str(tmp_path / "marked.jinja"))
    loaded.save_pretrained(tmp_path / "export")
    assert load_tokenizer(str(tmp_path / "export")).chat_template == MARKED
