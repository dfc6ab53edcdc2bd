"""Replay the hostile inputs and faults of docs/faults-and-safety.md against the default recipe, one line each.

    python tests/hostile_cases.py            # everything (about 20 minutes on 2 busy CPU cores)
    python tests/hostile_cases.py --quick    # without the multi-process and signal cases (about 4 minutes)
    python tests/hostile_cases.py -k payload # cases whose name contains "payload"

Each line: `PASS|FAIL  name  detail`. A case passes when the engine behaves as docs/faults-and-safety.md
promises (exit code, message naming the key or file, nothing lost, nothing executed).
Not part of the pytest suite (tests/test_safety*.py hold the fast regression tests); exit status 1 if any
case fails. Runs on CPU (gloo); the 2-rank cases use the real `deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from one_rank import free_port, hold_lock, launcher, outputs, taken_port
from test_safety import Payload

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
FAULTY = REPO / "tests" / "workers" / "faulty_train.py"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
FAST = ["--data.seq_len=128", "--chunking.chunk_size=64", "--optim.warmup_steps=0", "--data.num_samples=64"]
FAST += ["--logging.progress_bar=false", "--logging.tensorboard=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CASES: list[tuple[str, bool, Callable[[Path], tuple[bool, str]]]] = []  # (name, needs 2 ranks, case)


def case(name: str, slow: bool = False):
    def register(fn):
        CASES.append((name, slow, fn))
        return fn

    return register


def last_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("error: ")]
    return lines[-1][:300] if lines else text.strip()[-300:]


def train(root: Path, *args: str, faults: tuple[str, ...] = (), config: str = str(CONFIG)) -> tuple[int, str]:
    """One process, no launcher: (exit code, stdout + stderr)."""
    script = [str(FAULTY), *faults] if faults else [str(TRAIN)]
    cmd = [sys.executable, *script, "--config", config, *FAST, *outputs(root), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root, env=ENV)
    return r.returncode, r.stdout + r.stderr


def ranks(root: Path, *args: str, faults: tuple[str, ...] = (), n: int = 2) -> tuple[list[int], str]:
    """n processes with the rendezvous in the environment (as srun / torchrun start them)."""
    script = [str(FAULTY), *faults] if faults else [str(TRAIN)]
    port, procs = str(free_port()), []
    for rank in range(n):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, *script, "--config", str(CONFIG), *FAST, *outputs(root), *args]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(outs)


def user_error(code: int, out: str, *needles: str) -> tuple[bool, str]:
    err = last_error(out)
    ok = code == 2 and all(n in err for n in needles)
    return ok, f"exit {code}: {err}"


# ---------------------------------------------------------------------------------- configs and data


def quick_main(root: Path, *args: str, config: str = str(CONFIG)) -> tuple[int, str]:
    """launch/train.py's main() in this process (user errors end before any process group)."""
    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        code = launcher().main(["--config", config, *FAST, *outputs(root), *args])
    return code, out.getvalue()


@case("yaml alias bomb (9^9 leaves in 1 KB)")
def _(root):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    cfg = root / "bomb.yaml"
    cfg.write_text(CONFIG.read_text() + "\nbomb:\n  " + "\n  ".join(levels) + "\n")
    t0 = time.time()
    code, out = quick_main(root, config=str(cfg))
    ok, detail = user_error(code, out, "aliases")
    return ok and len(last_error(out)) < 400 and time.time() - t0 < 30, detail


@case("non-UTF-8 YAML")
def _(root):
    cfg = root / "latin1.yaml"
    cfg.write_bytes(CONFIG.read_bytes() + b"\n# caf\xe9\n")
    return user_error(*quick_main(root, config=str(cfg)), "latin1.yaml", "not UTF-8")


@case("unbounded value in an error message")
def _(root):
    code, out = quick_main(root, "--data.seq_len=[" + ",".join(["7"] * 100000) + "]")
    ok, detail = user_error(code, out, "data.seq_len")
    return ok and len(last_error(out)) < 400, detail


for _key in ("checkpoint.dir", "logging.dir"):

    @case(f"{_key} is a file")
    def _(root, key=_key):
        (root / "afile").write_text("")
        return user_error(*quick_main(root, f"--{key}={root}/afile"), key, "is a file")

    @case(f"{_key} not writable")
    def _(root, key=_key):
        ro = root / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):
            return (
                True,
                "SKIP: running as root, mode bits do not apply (tests/test_safety_config.py covers it)",
            )
        try:
            return user_error(*quick_main(root, f"--{key}={ro}/x"), key, "not writable")
        finally:
            ro.chmod(0o700)


@case("non-UTF-8 jsonl data")
def _(root):
    (root / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return user_error(
        *quick_main(root, "--data.kind=jsonl", f"--data.path={root}/d.jsonl"), "d.jsonl", "line 2"
    )


@case("non-UTF-8 text data")
def _(root):
    (root / "d.txt").write_bytes(b"caf\xe9")
    return user_error(
        *quick_main(root, "--data.kind=text", f"--data.path={root}/d.txt"), "d.txt", "not UTF-8"
    )


@case("non-parquet read as parquet")
def _(root):
    (root / "d.parquet").write_text('{"text": "json"}\n')
    return user_error(*quick_main(root, "--data.kind=parquet", f"--data.path={root}/d.parquet"), "d.parquet")


@case("tokenizer.json malformed / non-UTF-8")
def _(root):
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_bytes(b'{"model": "caf\xe9')
    return user_error(*quick_main(root, f"--data.tokenizer={root}/tok"), "data.tokenizer", "tokenizer.json")


@case("truncated model.safetensors")
def _(root):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=259)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "m")
    f = root / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    args = (f"--model.name_or_path={root}/m", "--model.hf_config=null")
    return user_error(*quick_main(root, *args), "model.name_or_path", "model.safetensors", "truncated")


@case("model directory without weights")
def _(root):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=259).save_pretrained(root / "m")  # fmt: skip
    args = (f"--model.name_or_path={root}/m", "--model.hf_config=null")
    return user_error(*quick_main(root, *args), "model.name_or_path", "holds no weights")


@case("data.seq_len: 1e9")
def _(root):
    return user_error(*quick_main(root, "--data.seq_len=1000000000"), "data.seq_len", "GiB of host memory")


@case("data.num_samples: 1e12")
def _(root):
    return user_error(*quick_main(root, "--data.num_samples=1000000000000"), "data.num_samples", "GiB")


# ------------------------------------------------ silently wrong: checkpointing, chat records, YAML values

SFT = REPO / "tests" / "data" / "sft"
CHAT_RUN = ("--data.kind=chat", f"--data.tokenizer={SFT / 'tokenizer'}", "--model.hf_config.vocab_size=400")


def chat_data(root: Path, *records: list[dict]) -> str:
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records))
    return f"--data.path={path}"


@case("HF gradient checkpointing enabled on the model: chunk-wise gradient exact")
def _(root):
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import grads_of, reference_grads, rel_error, tiny_batch, tiny_model

    from engine.chunkwise import ChunkSchedule, chunkwise_backward

    model = tiny_model("LlamaConfig").train()
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    model.gradient_checkpointing_enable()
    chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=8))
    err = rel_error(grads_of(model), ref)
    return err < 1e-10 and model.model.layers[0].gradient_checkpointing, f"relative gradient error {err:.1e}"


@case("ChunkwiseTrainer with TrainingArguments(gradient_checkpointing=True): gradient exact")
def _(root):
    sys.path.insert(0, str(REPO / "tests"))
    from test_hf_checkpointing import _trainer_grads
    from tiny import reference_grads, rel_error, tiny_batch, tiny_model

    _, ref = reference_grads(tiny_model("LlamaConfig").train(), *tiny_batch())
    seen = _trainer_grads(root, gradient_checkpointing=True)
    err = rel_error(seen["grads"], ref)
    return err < 1e-10 and any(seen["flags"]), f"relative gradient error {err:.1e}"


@case("YAML duplicate key (lr twice)")
def _(root):
    cfg = root / "dup.yaml"
    cfg.write_text(CONFIG.read_text().replace("  lr: 3.0e-3\n", "  lr: 3.0e-3\n  lr: 1.0e-4\n", 1))
    return user_error(*quick_main(root, config=str(cfg)), "duplicate key 'optim.lr' at lines")


@case("YAML second optim: section")
def _(root):
    cfg = root / "dup.yaml"
    cfg.write_text(CONFIG.read_text() + "\noptim:\n  steps: 5\n")
    return user_error(*quick_main(root, config=str(cfg)), "duplicate key 'optim' at lines")


for _key in ("optim.weight_decay", "optim.eps"):

    @case(f"{_key}: .inf")
    def _(root, key=_key):
        return user_error(*quick_main(root, f"--{key}=.inf"), f"{key}: must be a finite number")


@case("model.hf_config.rope_scaling (a key transformers still accepts)")
def _(root):
    r = subprocess.run(
        [sys.executable, "-m", "engine.config_load", "--config", str(CONFIG), "--no-check-paths",
         "--model.hf_config.rope_scaling={rope_type: linear, factor: 2.0}"],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300,
    )  # fmt: skip
    return r.returncode == 0 and "rope_scaling" in r.stdout, f"exit {r.returncode}: {last_error(r.stderr)}"


@case("chat: tool_calls the template does not render")
def _(root):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "ok", "tool_calls": [call]},
    ]
    return user_error(
        *quick_main(root, *CHAT_RUN, chat_data(root, turns)), "messages[1].tool_calls[0]", "does not render"
    )


@case("chat: content as a list of parts the template cannot render")
def _(root):
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello"},
    ]
    return user_error(
        *quick_main(root, *CHAT_RUN, chat_data(root, turns)), "chat.jsonl, line 1", "chat template"
    )


@case("chat: tool calls, a tool turn and text parts reach the template; the call is trained on")
def _(root):
    from engine.data import load_tokenizer
    from engine.data.chat import check_chat
    from engine.data.chat_render import render_chat

    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.content is string %}"
        "{{ m.content }}{% elif m.content %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}{{ '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turns = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}],
        },
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    tok = load_tokenizer(str(SFT / "tokenizer"))
    got = render_chat(tok, check_chat({"messages": turns}, "r", "messages"), "r", False, template)
    text, labelled = tok.decode(got.ids), tok.decode([t for t, m in zip(got.ids, got.loss) if m])
    ok = "Weather in Paris?" in text and "get_weather" in labelled and "sunny<" not in labelled
    return ok and "It is sunny." in labelled, f"trained on: {labelled!r}"


@case("chat: first answer token merged with the space (mask vs HF's)")
def _(root):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.data.chat_render import render_chat

    head = "{% for m in messages %}{{ m.role + ': ' }}"
    tail = "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    plain = head + "{{ m.content + '<|end|>' }}" + tail
    marked = (
        head + "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|end|>' }}{% endgeneration %}"
        "{% else %}{{ m.content + '<|end|>' }}{% endif %}" + tail
    )
    turns = [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "the sky is blue"}]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["assistant: the sky is blue"] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
    hf = tok.apply_chat_template(
        turns, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True
    )
    got = render_chat(tok, turns, "r", False, plain)
    first = got.answer_start
    same = got.ids == list(hf["input_ids"]) and got.loss == [bool(m) for m in hf["assistant_masks"]]
    return same and tok.decode(
        [got.ids[first]]
    ) == " the", f"first answer token {tok.decode([got.ids[first]])!r}"


@case("chat: endless chat template (30 s bound)")
def _(root):
    endless = root / "endless.jinja"
    endless.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    t0 = time.time()
    code, out = quick_main(root, *CHAT_RUN, chat_data(root, [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]), f"--data.chat_template={endless}")  # fmt: skip
    ok, detail = user_error(code, out, "chat.jsonl, line 1", "took longer than 30 s")
    return ok and time.time() - t0 < 120, detail


@case("a step without any loss token (trains on, loss 0, counted)")
def _(root):
    code, out = train(root, "--optim.steps=3", faults=("--no-loss-steps=2",))
    rec = [json.loads(x) for x in (root / "log" / "metrics.jsonl").read_text().splitlines()]
    ok = code == 0 and rec[1]["loss"] == 0.0 and not rec[1]["skipped"] and "held no loss token" in out
    return ok, f"exit {code}: losses {[r['loss'] for r in rec]}"


@case("tokenizer with its own code, 'y' on stdin")
def _(root):
    tok, marker = root / "tok", root / "code-ran"
    shutil.copytree(SFT / "tokenizer", tok)
    (tok / "custom_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PreTrainedTokenizerFast as CustomTok\n")  # fmt: skip
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": [None, "custom_tok.CustomTok"]}, tokenizer_class="CustomTok")
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root), *CHAT_RUN]
    r = subprocess.run([*args, f"--data.tokenizer={tok}", f"--data.path={SFT / 'chat.jsonl'}"], input="y\n",
                       capture_output=True, text=True, cwd=root, env=ENV, timeout=300)  # fmt: skip
    ok, detail = user_error(r.returncode, r.stdout + r.stderr, "trust_remote_code")
    return ok and not marker.exists(), detail + (" (its code ran)" if marker.exists() else "")


@case("model directory with its own code, 'y' on stdin")
def _(root):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, marker = root / "m", root / "code-ran"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=259)).save_pretrained(model)  # fmt: skip
    (model / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                   "from transformers import LlamaConfig\n"
                                                   "class CustomConfig(LlamaConfig):\n    model_type = 'customllama'\n")  # fmt: skip
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "configuration_custom.CustomConfig"}, model_type="customllama")
    (model / "config.json").write_text(json.dumps(cfg))
    args = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root)]
    r = subprocess.run([*args, f"--model.name_or_path={model}", "--model.hf_config=null"], input="y\n",
                       capture_output=True, text=True, cwd=root, env=ENV, timeout=300)  # fmt: skip
    ok, detail = user_error(r.returncode, r.stdout + r.stderr, "model.name_or_path", "trust_remote_code")
    return ok and not marker.exists(), detail + (" (its code ran)" if marker.exists() else "")


@case("SFT pad id outside the model's vocabulary")
def _(root):
    tok = root / "tok"
    shutil.copytree(SFT / "tokenizer", tok)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    t.add_special_tokens({"pad_token": "<xpad>"})  # id 400: just past a 400-row embedding
    t.save_pretrained(str(tok))
    args = (*CHAT_RUN, f"--data.tokenizer={tok}", f"--data.path={SFT / 'chat.jsonl'}", "--data.packing=false")
    return user_error(*quick_main(root, *args), "token id 400 (the pad id", "outside the model vocabulary")


@case("a data file tokenized once per host, not once per rank (2 processes)")
def _(root):
    rank = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from engine.config import DataConfig\n"
        "from engine.data import build_dataset, load_tokenizer\n"
        "from engine.data.host_cache import dataset_key, once_per_host\n"
        "root = Path(sys.argv[1])\n"
        "cfg = DataConfig(kind='jsonl', path=sys.argv[2], seq_len=128)\n"
        "def build():\n"
        "    open(root / 'builds', 'a').write('built\\n')\n"
        "    time.sleep(2)\n"
        "    return build_dataset(cfg, load_tokenizer('byte'), 259)\n"
        "ds = once_per_host(dataset_key(cfg, 259, False), build, root / 'cache')\n"
        "print('ROWS', len(ds), int(ds[len(ds) - 1]['input_ids'].sum()))\n"
    )
    (root / "one-line.jsonl").write_text(json.dumps({"text": "x" * 5_000_000}) + "\n")  # 5 MB on one line
    cmd = [sys.executable, "-c", rank, str(root), str(root / "one-line.jsonl")]
    env = {**ENV, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    rows = [o[0].strip().split("ROWS")[-1] for o in outs]
    builds = (root / "builds").read_text().count("built")
    ok = all(p.returncode == 0 for p in procs) and builds == 1 and rows[0] == rows[1]
    return ok, f"builds {builds}, rows {rows}" + ("" if ok else f" {outs[0][1][-300:]}")


# ---------------------------------------------------------------------------------------- checkpoints

_BASE: dict[str, Path] = {}


def base_checkpoint(root: Path) -> Path:
    """A 2-step, 1-rank run's checkpoint (made once), copied into `root` for tampering."""
    if "ckpt" not in _BASE:
        made = Path(tempfile.mkdtemp(prefix="hostile-base-"))
        code, out = train(made, "--optim.steps=2")
        assert code == 0, out[-2000:]
        _BASE["ckpt"] = made / "ckpt"
    shutil.copytree(_BASE["ckpt"], root / "ckpt")
    return root / "ckpt" / "global_step2"


FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt")
for _name in FILES:

    @case(f"pickle payload in {_name}")
    def _(root, name=_name):
        import torch

        tag = base_checkpoint(root)
        torch.save({"x": Payload(root / "ran")}, tag / name)
        code, out = quick_main(root, "--optim.steps=4", "--checkpoint.resume=auto")
        ok, detail = user_error(code, out, name, "refused")
        return ok and not (root / "ran").exists(), detail + (
            "" if not (root / "ran").exists() else " CODE RAN"
        )

    @case(f"truncated {_name}")
    def _(root, name=_name):
        tag = base_checkpoint(root)
        data = (tag / name).read_bytes()
        (tag / name).write_bytes(data[: len(data) // 2])
        return user_error(*quick_main(root, "--optim.steps=4", "--checkpoint.resume=auto"), name, "truncated")


@case("missing rng_rank0.pt: loud warning, resumes")
def _(root):
    tag = base_checkpoint(root)
    (tag / "rng_rank0.pt").unlink()
    code, out = train(root, "--optim.steps=3", "--checkpoint.resume=auto")
    return code == 0 and "WARNING" in out and "NOT continue bit for bit" in out, f"exit {code}"


@case("resume with a different model shape")
def _(root):
    base_checkpoint(root)
    code, out = train(
        root, "--optim.steps=4", "--checkpoint.resume=auto", "--model.hf_config.intermediate_size=96"
    )
    return user_error(code, out, "model differs", "mlp.gate_proj.weight")


@case("1-rank checkpoint resumed on 2 ranks", slow=True)
def _(root):
    base_checkpoint(root)
    codes, out = ranks(root, "--optim.steps=4", "--checkpoint.resume=auto")
    err = last_error(out)
    return codes == [2, 2] and "written by 1 data-parallel ranks" in err, f"exits {codes}: {err}"


@case("disk full during a save (1 rank)")
def _(root):
    code, out = train(root, "--optim.steps=4", "--checkpoint.every=2", faults=("--enospc-in-save=4",))
    ckpt = root / "ckpt"
    left = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("tmp."))
    ok = code == 1 and "No space left" in out and not left and (ckpt / "latest").read_text() == "global_step2"
    return ok, f"exit {code}, temporary dirs left {left}: {last_error(out)}"


@case("disk full on rank 1 only (2 ranks)", slow=True)
def _(root):
    args = ("--optim.steps=4", "--checkpoint.every=2")
    codes, out = ranks(root, *args, faults=("--enospc-in-save=4", "--rank-only=1"))
    ckpt = root / "ckpt"
    left = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("tmp."))
    ok = codes == [1, 1] and not left and (ckpt / "latest").read_text() == "global_step2"
    return ok, f"exits {codes}, temporary dirs left {left}: {last_error(out)}"


@case("two fresh runs into one logging.dir")
def _(root):
    first = train(root, "--optim.steps=2", f"--checkpoint.dir={root}/ck1")  # nothing to resume from
    second = train(root, "--optim.steps=1", f"--checkpoint.dir={root}/ck2")
    kept = root / "log" / "metrics.1.jsonl"
    ok = first[0] == second[0] == 0 and kept.is_file() and len(kept.read_text().splitlines()) == 2
    return ok, f"exits {first[0]}, {second[0]}; first run's records kept: {kept.is_file()}"


for _stage in (0, 1, 3):

    @case(f"ZeRO-{_stage} checkpoint resumes through the weights-only loader", slow=True)
    def _(root, stage=_stage):
        first = train(root, "--optim.steps=2", f"--deepspeed.zero_stage={stage}")
        second = train(root, "--optim.steps=3", f"--deepspeed.zero_stage={stage}", "--checkpoint.resume=auto")
        ok = first[0] == second[0] == 0 and "resumed from" in second[1]
        return ok, f"exits {first[0]}, {second[0]}: {last_error(second[1]) if second[0] else 'resumed'}"


# -------------------------------------------------------------------------- signals through launchers


def preemptible(root: Path) -> subprocess.Popen:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [sys.executable, str(REPO / "launch" / "preemptible.py"), str(deepspeed), "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root)]
    cmd += ["--optim.steps=300"]
    return subprocess.Popen(
        cmd, stdout=open(root / "out.log", "w"), stderr=subprocess.STDOUT, env=ENV, cwd=REPO
    )


def _before_step_two(root: Path, proc: subprocess.Popen) -> str | None:
    """Waits for the run's second logged step; the reason when it ended first or 600 s passed."""
    log = root / "log" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.time() > deadline:
            return "run ended before step 2: " + (root / "out.log").read_text()[-300:]
        time.sleep(0.05)
    return None


def _signal_case(root: Path, target: str, sig: int) -> tuple[bool, str]:
    import psutil

    proc = preemptible(root)
    log = root / "log" / "metrics.jsonl"
    if late := _before_step_two(root, proc):
        return False, late
    runner = psutil.Process(proc.pid).children()[0]
    inner = runner.children()[0]
    pid = {"supervisor": proc.pid, "deepspeed": runner.pid, "launcher": inner.pid}.get(target)
    os.kill(pid, sig) if pid else os.killpg(os.getpgid(runner.pid), sig)
    code = proc.wait(timeout=600)
    steps = len(log.read_text().splitlines())
    latest = (root / "ckpt" / "latest").read_text() if (root / "ckpt" / "latest").exists() else None
    ok = code == 0 and latest == f"global_step{steps}" and steps < 300
    return ok, f"exit {code}, stopped after step {steps}, latest {latest}"


for _target, _sig in [("supervisor", signal.SIGTERM), ("deepspeed", signal.SIGTERM), ("launcher", signal.SIGTERM),
                      ("group", signal.SIGTERM), ("supervisor", signal.SIGUSR1), ("launcher", signal.SIGUSR1)]:  # fmt: skip

    @case(f"{_sig.name} to the {_target} (deepspeed launcher, 2 ranks)", slow=True)
    def _(root, target=_target, sig=_sig):
        return _signal_case(root, target, sig)


@case("SIGTERM to one of two srun-style ranks", slow=True)
def _(root):
    port = str(free_port())
    procs = []
    cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root), "--optim.steps=300"]
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    log = root / "log" / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        if any(p.poll() is not None for p in procs):
            return False, "a rank ended early"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=600) for p in procs]
    steps = len(log.read_text().splitlines())
    return codes == [0, 0] and (
        root / "ckpt" / "latest"
    ).read_text() == f"global_step{steps}", f"exits {codes}"


# ------------------------------------------------------------------ one writer per run, nothing outside it


@case("second run on a locked checkpoint.dir (1 rank)")
def _(root):
    holder = hold_lock(root / "ckpt")
    try:
        return user_error(*quick_main(root), "checkpoint.dir", f"in use by another run (pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


@case("second run on a locked checkpoint.dir (2 ranks, deepspeed launcher)", slow=True)
def _(root):
    holder = hold_lock(root / "ckpt")
    try:
        code, out = _deepspeed(root)
    finally:
        holder.kill()
        holder.wait()
    named = [line for line in out.splitlines() if line.startswith("error: ") and f"(pid {holder.pid}" in line]
    ok = code == 2 and len(named) == 1  # errors are said once per node (local rank 0)
    return ok, f"exit {code}, {len(named)} lines name the holder: {last_error(out)}"


@case("lock of a SIGKILLed run is taken over with a message")
def _(root):
    holder = hold_lock(root / "ckpt")
    holder.kill()
    holder.wait()
    code, out = train(root, "--optim.steps=1")
    return code == 0 and "taking over" in out and f"pid {holder.pid}" in out, f"exit {code}"


@case("a save leaves a user's tmp.* in checkpoint.dir alone")
def _(root):
    (root / "ckpt" / "tmp.Xq3aB9kLm2").mkdir(parents=True)
    (root / "ckpt" / "tmp.Xq3aB9kLm2" / "notes").write_text("keep")
    code, out = train(root, "--optim.steps=1")
    kept = (root / "ckpt" / "tmp.Xq3aB9kLm2" / "notes").is_file()
    return code == 0 and kept, f"exit {code}, user's directory kept: {kept}"


for _name in ("tmp.latest", "zero_to_fp32.py", "tmp.global_step2", "tmp.export", "latest"):

    @case(f"symlink planted at checkpoint.dir/{_name}")
    def _(root, name=_name):
        outside = root / "outside"
        outside.mkdir()
        (outside / "f").write_text("keep")
        (root / "ckpt").mkdir()
        target = outside if name in ("tmp.global_step2", "tmp.export") else outside / "f"
        (root / "ckpt" / name).symlink_to(target)
        code, out = quick_main(root, "--optim.steps=2", "--checkpoint.export=hf")
        untouched = (
            sorted(p.name for p in outside.iterdir()) == ["f"] and (outside / "f").read_text() == "keep"
        )
        ok, detail = user_error(code, out, name, "symbolic link")
        return ok and untouched and not os.access(outside / "f", os.X_OK), detail


for _tag in ("../../elsewhere/global_step2", "/abs/path/global_step2"):

    @case(f"latest naming {_tag}")
    def _(root, tag=_tag):
        base_checkpoint(root)
        (root / "ckpt" / "latest").write_text(tag)
        return user_error(*quick_main(root, "--checkpoint.resume=auto"), "latest", "not a checkpoint of this")


@case("non-UTF-8 latest")
def _(root):
    base_checkpoint(root)
    (root / "ckpt" / "latest").write_bytes(b"global_step\xff")
    return user_error(*quick_main(root, "--checkpoint.resume=auto"), "latest", "not UTF-8")


@case("latest a symlink to a 1 GB file")
def _(root):
    base_checkpoint(root)
    with open(root / "big", "wb") as f:
        f.truncate(1 << 30)
    (root / "ckpt" / "latest").unlink()
    (root / "ckpt" / "latest").symlink_to(root / "big")
    t0 = time.time()
    ok, detail = user_error(*quick_main(root, "--checkpoint.resume=auto"), "latest", "symbolic link")
    return ok and time.time() - t0 < 30, detail


def _fifo_case(root: Path, fifo: Path, *args: str) -> tuple[bool, str]:
    """The start must refuse the pipe, never block on it (if it does, a writer unblocks it after 60 s)."""
    os.mkfifo(fifo)
    result: list = []
    import threading

    t = threading.Thread(target=lambda: result.append(quick_main(root, *args)), daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))
        t.join(60)
        return False, f"blocked on the named pipe {fifo.name}"
    return user_error(*result[0], fifo.name, "not a regular file")


@case("named pipe as tokenizer.json")
def _(root):
    (root / "tok").mkdir()
    return _fifo_case(root, root / "tok" / "tokenizer.json", f"--data.tokenizer={root}/tok")


@case("named pipe as a checkpoint file (rng_rank0.pt)")
def _(root):
    tag = base_checkpoint(root)
    (tag / "rng_rank0.pt").unlink()
    return _fifo_case(root, tag / "rng_rank0.pt", "--optim.steps=4", "--checkpoint.resume=auto")


@case("named pipe as latest")
def _(root):
    base_checkpoint(root)
    (root / "ckpt" / "latest").unlink()
    return _fifo_case(root, root / "ckpt" / "latest", "--optim.steps=4", "--checkpoint.resume=auto")


@case("pickle payload in pytorch_model.bin")
def _(root):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=259)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "m", safe_serialization=False)
    torch.save({"x": Payload(root / "ran")}, root / "m" / "pytorch_model.bin")
    code, out = quick_main(root, f"--model.name_or_path={root}/m", "--model.hf_config=null")
    ok, detail = user_error(code, out, "pytorch_model.bin", "refused")
    return ok and not (root / "ran").exists(), detail


@case("full logging.dir disk keeps the step's checkpoint")
def _(root):
    code, out = train(root, "--optim.steps=3", "--checkpoint.every=1", faults=("--enospc-in-log=2",))
    latest = (root / "ckpt" / "latest").read_text() if (root / "ckpt" / "latest").exists() else None
    warned = out.count("warning: writing metrics under logging.dir")
    return (
        code == 0 and latest == "global_step3" and warned == 1,
        f"exit {code}, latest {latest}, {warned} warning",
    )


# ------------------------------------------------------------------ every rank agrees before it waits


def _deepspeed(root: Path, *args: str, port: int | None = None) -> tuple[int, str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port or free_port()), str(TRAIN)]
    cmd += ["--config", str(CONFIG), *FAST, *outputs(root), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root, env=ENV)
    return r.returncode, r.stdout + r.stderr


@case("one rank's data unreadable (srun-style, 2 ranks)", slow=True)
def _(root):
    (root / "empty.jsonl").write_text("")
    port, procs, t0 = str(free_port()), [], time.time()
    per_rank = [[], ["--data.kind=jsonl", f"--data.path={root}/empty.jsonl"]]  # rank 1 reads the empty file
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for rank, data in enumerate(per_rank):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root), *data]
        procs.append(subprocess.Popen(cmd, env=env, **pipes))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    except subprocess.TimeoutExpired:
        return False, "a rank still waits after 300 s"
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    return codes == [2, 2] and "rank 1" in last_error(
        outs[0]
    ), f"exits {codes} in {time.time() - t0:.0f} s: {last_error(outs[0])}"


@case("MASTER_PORT in use (1 rank)")
def _(root):
    with taken_port() as port:
        env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root)]
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env={**env, "MASTER_PORT": str(port)}
        )
    out = r.stdout + r.stderr
    return (
        user_error(r.returncode, out, f"MASTER_PORT {port} is in use")
        if "Traceback" not in out
        else (False, "traceback")
    )


@case("MASTER_PORT in use (2 ranks, deepspeed launcher)", slow=True)
def _(root):
    with taken_port() as port:
        code, out = _deepspeed(root, port=port)
    return code == 2 and f"error: MASTER_PORT {port} is in use" in out, f"exit {code}: {last_error(out)}"


# ------------------------------------------------------------------ ranks never outlive their job


def _bare_deepspeed(root: Path, supervised: bool = False) -> subprocess.Popen:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN)]
    cmd += ["--config", str(CONFIG), *FAST, *outputs(root), "--optim.steps=300"]
    if supervised:
        cmd = [sys.executable, str(REPO / "launch" / "preemptible.py"), *cmd]
    out = open(root / "out.log", "w")
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO, start_new_session=True
    )


def _orphan_case(root: Path, target: str, sig: int, supervised: bool) -> tuple[bool, str]:
    import psutil

    proc = _bare_deepspeed(root, supervised)
    log = root / "log" / "metrics.jsonl"
    if late := _before_step_two(root, proc):
        return False, late
    tree = psutil.Process(proc.pid).children(recursive=True)
    inner = [p for p in tree if "deepspeed.launcher.launch" in " ".join(p.cmdline())][0]
    ranks = inner.children()
    runner = inner.parent()
    pid = {"supervisor": proc.pid, "deepspeed": runner.pid, "launcher": inner.pid}[target]
    os.kill(pid, sig)
    _, alive = psutil.wait_procs(ranks, timeout=300)
    for p in alive:
        p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    steps = len(log.read_text().splitlines())
    latest = (root / "ckpt" / "latest").read_text() if (root / "ckpt" / "latest").exists() else None
    out = (root / "out.log").read_text()
    ok = not alive and latest == f"global_step{steps}" and steps < 300 and "preempted by" in out
    return ok, f"ranks left training: {len(alive)}, stopped after step {steps}, latest {latest}"


for _target, _sig, _sup in [("deepspeed", signal.SIGTERM, False), ("deepspeed", signal.SIGKILL, False),
                            ("launcher", signal.SIGKILL, False), ("supervisor", signal.SIGKILL, True)]:  # fmt: skip

    @case(f"{_sig.name} to the {'supervisor' if _sup and _target == 'supervisor' else 'bare ' + _target} (2 ranks): no orphan", slow=True)  # fmt: skip
    def _(root, target=_target, sig=_sig, sup=_sup):
        return _orphan_case(root, target, sig, sup)


def _ctrl_c(root: Path, twice: bool) -> tuple[bool, str]:
    cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(root), "--optim.steps=300"]
    cmd += ["--data.seq_len=4096", "--chunking.chunk_size=256"]
    out = root / "out.log"
    proc = subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, env=ENV)
    log = root / "log" / "metrics.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            return False, "run ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    if twice:
        while "a second Ctrl-C aborts" not in out.read_text() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    text = out.read_text()
    if twice:
        return code == 130 and "aborted by a second Ctrl-C" in text, f"exit {code}"
    steps = len(log.read_text().splitlines())
    latest = (root / "ckpt" / "latest").read_text()
    ok = (
        code == 0
        and "a second Ctrl-C aborts" in text
        and latest == f"global_step{steps}"
        and "Traceback" not in text
    )
    return ok, f"exit {code}, stopped after step {steps}, latest {latest}"


@case("Ctrl-C: saves and stops", slow=True)
def _(root):
    return _ctrl_c(root, twice=False)


@case("Ctrl-C twice: aborts", slow=True)
def _(root):
    return _ctrl_c(root, twice=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="skip the multi-process launcher / signal cases")
    p.add_argument("-k", default="", help="only cases whose name contains this (A|B: either)")
    args = p.parse_args()
    failed = 0
    for name, slow, fn in CASES:
        if (args.quick and slow) or not any(k in name.lower() for k in args.k.lower().split("|")):
            continue
        root = Path(tempfile.mkdtemp(prefix="hostile-"))
        t0 = time.time()
        try:
            ok, detail = fn(root)
        except Exception as e:  # a case that crashes is a failed case, not the end of the replay
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}  [{time.time() - t0:.0f} s]  {detail}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
