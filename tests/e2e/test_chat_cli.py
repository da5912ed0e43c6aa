"""`dsfm chat` driven through stdin, as a user types, on a small trained chat model."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, dsfm, job_env

pytestmark = pytest.mark.distributed  # the fixture trains with DeepSpeed

SYSTEM = "Be brief."
FLAGS = ["--max-new-tokens", "16", "--seed", "3", "--temperature", "0.8"]


def chat(run, stdin: str, *flags: str):
    return subprocess.run(
        [sys.executable, "-m", "dsfm.cli", "chat", str(run), *flags],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=job_env(),
    )


def test_turns_equal_generate_and_old_turns_leave_the_window(chat_run):
    import torch  # noqa: F401  (loads before dsfm's model modules, as the CLI does)

    from dsfm.data.chat import Template, render_prompt
    from dsfm.eval.generate import sample
    from dsfm.interop.weights import load_model

    proc = chat(
        chat_run,
        "Say tiger.\nSay ocean.\n/reset\nSay bread.\n",  # then EOF, as Ctrl-D
        "--system",
        SYSTEM,
        *FLAGS,
    )
    assert proc.returncode == 0, proc.stderr
    banner, body = proc.stdout.split("\n", 1)
    assert banner.startswith("chatting with") and "64-token context" in banner

    # A reply is `dsfm generate --chat` on the same rendered prompt, same flags.
    def generated(prompt: str) -> str:
        out = dsfm(
            "generate", str(chat_run), "--chat", "--system", SYSTEM, "--prompt", prompt, *FLAGS
        ).stdout
        return out.removesuffix("\n")

    first, third = generated("Say tiger."), generated("Say bread.")
    # The second turn does not fit beside the first in 64 - 16 tokens: the first exchange
    # is dropped, the system message kept, so the reply is generate's on that prompt.
    model, tok = load_model(chat_run)
    end_id = Template.of(tok).end_id
    kept = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say ocean."}]
    assert (
        len(
            render_prompt(
                kept[:1]
                + [
                    {"role": "user", "content": "Say tiger."},
                    {"role": "assistant", "content": first},
                ]
                + kept[1:],
                tok,
            )
        )
        > 64 - 16
    )
    second = tok.decode(
        sample(
            model,
            render_prompt(kept, tok),
            max_new_tokens=16,
            temperature=0.8,
            seed=3,
            eot_id=end_id,
        )
    )
    notice = r"\(the conversation outgrew the 64-token context: [^\n]*system message stays\)"
    expected = (
        re.escape(f">>> Say tiger.\n{first}\n>>> Say ocean.\n")
        + notice
        + re.escape(f"\n{second}\n>>> /reset\n(conversation cleared)\n>>> Say bread.\n{third}\n")
        + re.escape(">>> \n")
    )
    assert re.fullmatch(expected, body), body
    assert body.count("outgrew") == 1  # said once

    # The reply stopped at the end-of-turn token the model drew, before the token budget.
    ids = render_prompt(kept[:1] + [{"role": "user", "content": "Say tiger."}], tok)
    drawn = sample(model, ids, max_new_tokens=16, temperature=0.8, seed=3)  # no stop
    n = len(tok.encode(first))
    assert n < 16 and drawn[n] == end_id and tok.decode(drawn[:n]) == first


def test_commands_and_refusals(chat_run, tmp_path):
    proc = chat(chat_run, "/help\n/bogus\n/exit\nSay tiger.\n", *FLAGS)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1:] == [
        ">>> /help",
        "/reset starts over (the system message stays), /exit or Ctrl-D quits",
        ">>> /bogus",
        "unknown command /bogus; /reset starts over (the system message stays), /exit or "
        "Ctrl-D quits",
        ">>> /exit",
    ]  # nothing after /exit is read

    proc = chat(chat_run, "hi\n", "--system", "x " * 40, *FLAGS)
    assert proc.returncode == 2 and "system message alone is" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout

    proc = chat(chat_run, "Say " + "tiger " * 20 + "\nSay tiger.\n", *FLAGS)
    assert proc.returncode == 0
    assert "over the 48 that leave room for a reply; shorten it" in proc.stdout
    after = proc.stdout.split("shorten it")[1].split(">>> Say tiger.\n")[1]
    assert after.endswith("\n>>> \n") and len(after) > len("\n>>> \n")  # it went on: a reply

    proc = chat(chat_run, "", "--top-p", "2", *FLAGS)
    assert proc.returncode == 2 and "top_p must be in (0, 1]" in proc.stderr

    from dsfm.data.tokenizer import byte_tokenizer
    from dsfm.train import checkpoint

    plain = tmp_path / "plain"  # the same tag, with a tokenizer that has no chat tokens
    shutil.copytree(chat_run / "checkpoints" / "final", plain)
    byte_tokenizer().save(plain)
    checkpoint.write_manifest(plain)  # an edited tag, not a damaged one
    proc = chat(plain, "hi\n", *FLAGS)
    assert proc.returncode == 2 and "is not a chat model" in proc.stderr
    assert "dsfm generate" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
