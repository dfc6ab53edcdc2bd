"""A tokenizer directory with its own code: loaded with trust_remote_code as the run config says, never
by asking on stdin (where a "y" would run the directory's code)."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest

from engine.data import load_tokenizer

SHIPPED = Path(__file__).resolve().parent / "data" / "sft" / "tokenizer"


def remote_code_tokenizer(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "tok"
    shutil.copytree(SHIPPED, d)
    marker = tmp_path / "code-ran"
    (d / "custom_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTok"]}
    cfg["tokenizer_class"] = "CustomTok"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, marker


def test_remote_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    d, marker = remote_code_tokenizer(tmp_path)

    asked = []

    def user_says_yes(prompt=""):  # what a user at the terminal might answer
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", user_says_yes)
    with pytest.raises(
        ValueError, match="data.tokenizer: .* holds code of its own .* model.trust_remote_code: true"
    ):
        load_tokenizer(str(d))
    assert not asked and not marker.exists()  # nobody was asked, none of the directory's code ran
    tok = load_tokenizer(str(d), trust_remote_code=True)  # the run config's model.trust_remote_code: true
    assert marker.exists() and type(tok).__name__ == "CustomTok"


def test_model_with_code_of_its_own_is_one_error_naming_the_key(tmp_path, monkeypatch):
    """The model directory's config.json maps AutoConfig to a module of its own: refused in one line naming
    model.name_or_path and model.trust_remote_code, nothing asked, none of its code run; with
    trust_remote_code true it loads (the control)."""
    from transformers import LlamaConfig

    from engine.config import ModelConfig
    from engine.model import model_config

    d, marker = tmp_path / "model", tmp_path / "code-ran"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(d)
    (d / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'customllama'\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "configuration_custom.CustomConfig"}, model_type="customllama")
    (d / "config.json").write_text(json.dumps(cfg))
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ValueError) as e:
        model_config(ModelConfig(name_or_path=str(d)))
    assert str(e.value) == (
        f"model.name_or_path: {str(d)!r} holds code of its own (auto_map in its config.json), which runs only "
        "with model.trust_remote_code: true"
    )
    assert not asked and not marker.exists()
    assert model_config(ModelConfig(name_or_path=str(d), trust_remote_code=True)).model_type == "customllama"
    assert marker.exists()
