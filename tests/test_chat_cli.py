"""`engine chat` in a real terminal: tmux runs it, send-keys types, capture-pane
reads the screen. History is checked through --save-history and against the
offline `LLM` (the second reply is the greedy continuation of the whole
conversation, not of the last message alone)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from chat_models import VOCAB_SIZE, build_chat_model
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chatml_model(make_hf_model, tokenizer_dir, tmp_path_factory):
    # a long context, so that a reply lasts long enough to be interrupted
    base = make_hf_model("llama", vocab_size=VOCAB_SIZE, max_position_embeddings=16384)
    return build_chat_model("chatml", base, tokenizer_dir, tmp_path_factory.mktemp("chatml"))


class Tmux:
    """One detached tmux session running a command, on a tmux server of its own
    (its own socket): a shared server that exits as the previous test's last session
    closes makes the next `new-session` fail with "server exited unexpectedly"."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path) -> None:
        self.name = f"engine-chat-{uuid.uuid4().hex[:8]}"
        self.tmux = ["tmux", "-L", self.name]
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()
                           if k.startswith(("ENGINE_", "HF_", "PYTHONPATH", "TOKENIZERS",
                                            "TRANSFORMERS", "PATH", "HOME", "FORCED_")))
        script = f"cd {shlex.quote(str(cwd))} && env {exports} {command}; echo EXIT=$?; sleep 60"
        subprocess.run([*self.tmux, "new-session", "-d", "-s", self.name, "-x", "200", "-y", "50",
                        "bash", "-c", script], check=True, timeout=10)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True, timeout=10)

    def enter(self, line: str) -> None:
        """Type `line` and press Enter, once the typed text is on the screen: keys typed
        while the program sets up its terminal can be flushed (a loaded machine makes
        that window wide), so the line is typed again until it shows."""
        shown = line.strip()[-30:]
        for _ in range(10):
            before = self.screen().count(shown)
            self.send("C-u", line)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.screen().count(shown) > before:
                    self.send("Enter")
                    return
                time.sleep(0.1)
        raise AssertionError(f"the typed line never appeared; screen:\n{self.screen()}")

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-J", "-S", "-200", "-t",
                               self.name], capture_output=True, text=True, timeout=10).stdout

    def wait_for(self, predicate, what: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], timeout=10, capture_output=True)


def _chat_command(model: Path, history: Path, *extra: str) -> str:
    args = ["chat", "--model", str(model), "--dtype", "float32", "--kv-cache-memory",
            str(2**24), "--save-history", str(history), *extra]
    return shlex.join([sys.executable, "-m", "engine", *args])


def _history(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []


def _wait_history(path: Path, length: int, timeout: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = _history(path)
        if len(messages) >= length:
            return messages
        time.sleep(0.2)
    raise AssertionError(f"{path} never reached {length} messages: {_history(path)}")


def _prompt_count(screen: str) -> int:
    return len(re.findall(r"^>>> ", screen, flags=re.M))


def test_two_turns_keep_the_history(chatml_model, tmp_path):
    from engine import LLM, SamplingParams

    history = tmp_path / "history.json"
    tmux = Tmux(_chat_command(chatml_model, history, "--temperature", "0", "--max-tokens",
                              "10", "--ignore-eos", "--system", "Be brief."),
                subprocess_env(), ROOT)
    try:
        tmux.wait_for(lambda s: _prompt_count(s) >= 1, "the first prompt")
        tmux.enter("hello there")
        first = _wait_history(history, 3)  # system, user, assistant
        tmux.wait_for(lambda s: _prompt_count(s) >= 2, "the second prompt")
        tmux.enter("and then?")
        messages = _wait_history(history, 5)
        tmux.wait_for(lambda s: _prompt_count(s) >= 3, "the third prompt")
        tmux.enter("/exit")
        screen = tmux.wait_for(lambda s: "EXIT=" in s, "the exit")
    finally:
        tmux.close()
    assert "EXIT=0" in screen
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[:3] == first[:3] and messages[3]["content"] == "and then?"
    words = re.findall(r"[A-Za-z_]{3,}", messages[2]["content"])
    if words:  # the first reply was streamed to the screen
        assert max(words, key=len) in screen

    llm = LLM(str(chatml_model), dtype="float32", kv_cache_memory=2**24)
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        with_history = llm.chat(messages[:4], params)[0].outputs[0].text
        without = llm.chat([messages[0], messages[3]], params)[0].outputs[0].text
    finally:
        llm.shutdown()
    assert messages[4]["content"] == with_history
    assert with_history != without  # the second reply depends on the first turn


def test_ctrl_c_stops_the_reply_and_keeps_the_session(chatml_model, tmp_path):
    history = tmp_path / "history.json"
    tmux = Tmux(_chat_command(chatml_model, history, "--max-tokens", "16000",
                              "--ignore-eos", "--sampling-seed", "1"),
                subprocess_env(), ROOT)
    try:
        tmux.wait_for(lambda s: _prompt_count(s) >= 1, "the first prompt")
        tmux.enter("write forever")
        # the reply is streaming: text has appeared after the typed line
        tmux.wait_for(lambda s: len(s.split("write forever", 1)[-1].strip()) > 40,
                      "streamed reply text")
        tmux.send("C-c")
        tmux.wait_for(lambda s: "[stopped]" in s and _prompt_count(s) >= 2,
                      "the stopped reply and a new prompt")
        first = _wait_history(history, 2)
        tmux.enter("again")
        tmux.wait_for(lambda s: len(s.split(">>> again", 1)[-1].strip()) > 40,
                      "the second reply streaming")
        tmux.send("C-c")
        tmux.wait_for(lambda s: s.count("[stopped]") >= 2 and _prompt_count(s) >= 3,
                      "the second stop")
        messages = _wait_history(history, 4)
        tmux.enter("/exit")
        screen = tmux.wait_for(lambda s: "EXIT=" in s, "the exit")
    finally:
        tmux.close()
    assert "EXIT=0" in screen
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[:2] == first[:2]
    assert 0 < len(messages[1]["content"]) and "Traceback" not in screen


def test_piped_stdin_is_one_message_and_the_reply_is_printed(chatml_model, tmp_path):
    from engine import LLM, SamplingParams

    proc = subprocess.run(
        [sys.executable, "-m", "engine", "chat", "--model", str(chatml_model), "--dtype",
         "float32", "--temperature", "0", "--max-tokens", "8", "--ignore-eos",
         "--kv-cache-memory", str(2**24)],
        input="line one\nline two\n", capture_output=True, text=True, timeout=120,
        env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    llm = LLM(str(chatml_model), dtype="float32", kv_cache_memory=2**24)
    try:
        expected = llm.chat([{"role": "user", "content": "line one\nline two\n"}],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    finally:
        llm.shutdown()
    assert proc.stdout == expected[0].outputs[0].text + "\n"


def test_default_model_error_says_what_to_pass():
    proc = subprocess.run([sys.executable, "-m", "engine", "chat"], input="hi",
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no chat template" in proc.stderr and "--model" in proc.stderr


def test_too_long_message_is_an_error_and_clear_starts_over(chatml_model, tmp_path):
    history = tmp_path / "history.json"
    tmux = Tmux(_chat_command(chatml_model, history, "--max-model-len", "64",
                              "--max-tokens", "4", "--temperature", "0"),
                subprocess_env(), ROOT)
    try:
        tmux.wait_for(lambda s: _prompt_count(s) >= 1, "the first prompt")
        tmux.enter("word " * 80)
        tmux.wait_for(lambda s: "engine chat: error:" in s and _prompt_count(s) >= 2,
                      "the error and a new prompt")
        tmux.enter("hi")
        messages = _wait_history(history, 2)
        tmux.wait_for(lambda s: _prompt_count(s) >= 3, "the third prompt")
        tmux.enter("/clear")
        tmux.wait_for(lambda s: "(conversation cleared)" in s, "the clear")
        tmux.enter("again")
        tmux.wait_for(lambda s: _prompt_count(s) >= 5, "the fifth prompt")
        cleared = _wait_history(history, 2)
        tmux.enter("/exit")
        screen = tmux.wait_for(lambda s: "EXIT=" in s, "the exit")
    finally:
        tmux.close()
    assert "EXIT=0" in screen and "Traceback" not in screen
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    assert [m["content"] for m in cleared if m["role"] == "user"] == ["again"]


def test_control_characters_in_model_text_are_shown_escaped():
    from engine.cli.common import terminal_safe

    assert terminal_safe("a\x1b]0;title\x07b") == "a\\x1b]0;title\\x07b"
    assert terminal_safe("over\rwrite \x9b2J \x7f \x00") == "over\\x0dwrite \\x9b2J \\x7f \\x00"
    kept = "lines\nand\ttabs, é, 中文, emoji \U0001f600, \\x1b typed by hand"
    assert terminal_safe(kept) == kept


# a logits processor that makes the model write an operating-system command's
# start (ESC ] 0 ;) and then text, over and over: a terminal given those
# characters raw hides everything after them (tmux included)
FORCING_MODULE = """
import os
import torch
from engine.sample import LogitsProcessor, apply_batch_update


class Forcing(LogitsProcessor):
    def __init__(self, config, device):
        super().__init__(config, device)
        self.ids = [int(i) for i in os.environ["FORCED_TOKEN_IDS"].split(",")]
        self.outputs = {}  # batch row -> the request's live list of output tokens

    def is_argmax_invariant(self):
        return False

    def update_state(self, batch_update):
        apply_batch_update(self.outputs, batch_update, lambda added: added.output_token_ids)

    def apply(self, logits):
        for row, output in self.outputs.items():
            forced = self.ids[len(output) % len(self.ids)]
            keep = float(logits[row, forced])
            logits[row] = -torch.inf
            logits[row, forced] = keep
        return logits
"""


def test_escape_sequences_the_model_writes_are_shown_not_obeyed(chatml_model, tmp_path):
    from tokenizers import Tokenizer

    forced_text = "\x1b]0;hidden "
    ids = Tokenizer.from_file(str(chatml_model / "tokenizer.json")).encode(forced_text).ids
    (tmp_path / "forcing_lp.py").write_text(FORCING_MODULE)
    env = subprocess_env(PYTHONPATH=str(tmp_path), FORCED_TOKEN_IDS=",".join(map(str, ids)))
    history = tmp_path / "history.json"
    tmux = Tmux(_chat_command(chatml_model, history, "--max-tokens", str(3 * len(ids)),
                              "--ignore-eos", "--logits-processors", "forcing_lp:Forcing"),
                env, ROOT)
    try:
        tmux.wait_for(lambda s: _prompt_count(s) >= 1, "the first prompt")
        tmux.enter("hello")
        # raw, the ESC ] would hide the rest of the reply and the next prompt
        screen = tmux.wait_for(lambda s: _prompt_count(s) >= 2, "the reply and a new prompt")
        tmux.enter("/exit")
        tmux.wait_for(lambda s: "EXIT=" in s, "the exit")
    finally:
        tmux.close()
    assert "\\x1b]0;hidden \\x1b]0;hidden \\x1b]0;hidden" in screen
    # the history keeps the model's exact text
    assert _wait_history(history, 2)[1]["content"] == forced_text * 3
    # piped, `engine generate` prints the exact text too
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(chatml_model), "--dtype",
         "float32", "--kv-cache-memory", str(2**24), "--max-tokens", str(len(ids)),
         "--ignore-eos", "--logits-processors", "forcing_lp:Forcing", "--prompt", "hi"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi" + forced_text + "\n"


@pytest.mark.slow
def test_ctrl_c_keeps_tensor_parallel_workers_alive(chatml_model, tmp_path):
    """The terminal sends Ctrl-C to the whole process group, workers included:
    they ignore it, so the next turn still runs on both ranks."""
    history = tmp_path / "history.json"
    tmux = Tmux(_chat_command(chatml_model, history, "--tensor-parallel-size", "2",
                              "--max-tokens", "16000", "--ignore-eos"),
                subprocess_env(), ROOT)
    try:
        tmux.wait_for(lambda s: _prompt_count(s) >= 1, "the first prompt", timeout=180)
        tmux.enter("write forever")
        tmux.wait_for(lambda s: len(s.split("write forever", 1)[-1].strip()) > 40,
                      "streamed reply text")
        tmux.send("C-c")
        tmux.wait_for(lambda s: "[stopped]" in s and _prompt_count(s) >= 2, "the stop")
        tmux.enter("again")
        tmux.wait_for(lambda s: len(s.split(">>> again", 1)[-1].strip()) > 40,
                      "the second reply streaming")
        tmux.send("C-c")
        tmux.wait_for(lambda s: s.count("[stopped]") >= 2 and _prompt_count(s) >= 3,
                      "the second stop")
        tmux.enter("/exit")
        screen = tmux.wait_for(lambda s: "EXIT=" in s, "the exit")
    finally:
        tmux.close()
    assert "EXIT=0" in screen and "died" not in screen and "Traceback" not in screen
    assert len(_history(history)) == 4


def test_ctrl_c_during_a_long_prompt_stops_before_the_first_token(chatml_model, capsys):
    """A long conversation's prompt takes several engine steps before the reply's
    first token: Ctrl-C is honoured after the step it arrived in, not only once a
    token comes. The signal is sent from inside the second step (a real SIGINT to
    this process, handled by the chat's own handler)."""
    import os
    import signal

    from engine import LLM, SamplingParams
    from engine.cli.chat import ChatSession

    llm = LLM(str(chatml_model), dtype="float32", kv_cache_memory=2**24,
              max_num_batched_tokens=64, max_num_seqs=1)
    try:
        session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        session.messages.append({"role": "user", "content": "word " * 400})
        assert len(session.prompt_ids()) > 4 * 64  # at least five prompt steps
        engine = llm.llm_engine
        real_step, steps = engine.step, []

        def step():
            outputs = real_step()
            steps.append([o.request_id for o in outputs])
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return outputs

        engine.step = step
        handler = signal.getsignal(signal.SIGINT)
        try:
            text, stopped = session._stream_reply()
        finally:
            del engine.step
        assert (text, stopped) == ("", True)
        assert len(steps) == 2 and steps == [[], []]  # two prompt chunks, no token yet
        assert not engine.has_unfinished_requests()
        assert signal.getsignal(signal.SIGINT) is handler  # the chat's own is gone
        # the session goes on: the next reply runs to its end
        text, stopped = session._stream_reply()
        assert text and not stopped
    finally:
        llm.shutdown()
    assert capsys.readouterr().out == text


def test_chat_runs_one_sequence_and_sizes_its_cache_for_one(chatml_model):
    """A chat is one conversation: the engine under `engine chat` runs one sequence
    at a time (its warm-up runs no larger decode batch, its KV cache holds one
    full-length sequence), and --max-num-seqs still overrides it."""
    from engine.cli.main import build_parser
    from engine.engine_args import EngineArgs

    parser = build_parser()
    assert EngineArgs.from_cli_args(parser.parse_args(["chat", "m"])).max_num_seqs == 1
    assert EngineArgs.from_cli_args(
        parser.parse_args(["chat", "m", "--max-num-seqs", "3"])).max_num_seqs == 3
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "chat", str(chatml_model), "--dtype", "float32",
         "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--temperature", "0",
         "--max-tokens", "2"],
        input="hi", capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    # 64 MiB holds more than one 512-token sequence (and less than 256 of them)
    kv_line = next(line for line in proc.stderr.splitlines() if "KV cache:" in line)
    assert "room for max_num_seqs=1 sequences of max_model_len=512" in kv_line, kv_line


def test_the_start_up_profile_reaches_the_prompt_and_times_each_phase(chatml_model):
    """benchmarks/profile_first_prompt.py runs the real `engine chat` up to its
    prompt and prints a line per phase (so the numbers in docs/benchmarks.md can be
    reproduced)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_first_prompt.py"), str(chatml_model),
         "--dtype", "float32", "--kv-cache-memory", "16MiB"],
        capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    phases = {line[:44].strip() for line in proc.stdout.splitlines()}
    assert {"import torch", "Worker.load_model", "warm-up step of 1 tokens",
            "ChatSession.check_template", "to the prompt (this process)"} <= phases, proc.stdout
