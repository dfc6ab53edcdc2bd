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
