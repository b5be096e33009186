"""The demos' wait for Ctrl-C: a signal sent the moment "press Ctrl-C" is read
ends the wait cleanly, also when the demo was started with SIGINT ignored."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CHILD = """
from segd.demo import wait_for_ctrl_c
# 200 KB after the prompt: the child is still writing (the pipe is full) when
# the signal comes, the window a signal used to land in.
wait_for_ctrl_c("press Ctrl-C", *["." * 200] * 1000)
print("waited", flush=True)
"""


def _run(sig: signal.Signals, ignore_sigint: bool) -> tuple[int, str]:
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if ignore_sigint
        else None,
    )
    assert p.stdout is not None
    first = p.stdout.readline()
    assert first == b"press Ctrl-C\n", first
    p.send_signal(sig)  # at once: the child may still be saying the other lines
    out = p.communicate(timeout=30)[0].decode()
    return p.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_sent_as_soon_as_the_prompt_is_read_ends_the_wait_cleanly(
    sig: signal.Signals,
) -> None:
    code, out = _run(sig, ignore_sigint=False)
    assert code == 0 and out.endswith("waited\n"), (code, out)


def test_ctrl_c_reaches_a_demo_started_with_sigint_ignored() -> None:
    code, out = _run(signal.SIGINT, ignore_sigint=True)
    assert code == 0 and out.endswith("waited\n"), (code, out)
