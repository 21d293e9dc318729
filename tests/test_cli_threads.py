"""The CPU thread policy of ``orthotune finetune``: how many threads, and idle OpenMP threads that sleep.

Truths: injected core counts and loads (the arithmetic of the rule), a fake ``/proc/loadavg``, and a fresh
interpreter in which the policy runs before torch is imported (the only place the waiting policy can act).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orthotune.cli import threads as cli_threads
from orthotune.cli.threads import choose_cpu_threads, prepare_openmp_environment

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [(8, 0.0, 8), (8, 2.6, 5), (8, 7.9, 1), (8, 30.0, 1), (2, 1.0, 1), (2, 0.2, 2), (1, 0.0, 1)],
)
def test_free_cores_less_the_load_at_least_one(
    cores: int, busy: float, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_threads, "available_cores", lambda: cores)
    choice = choose_cpu_threads(environ={}, busy=busy)
    assert choice.threads == expected and choice.cores == cores
    assert f"{cores} cores" in choice.describe()


def test_an_explicit_request_then_omp_num_threads_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_threads, "available_cores", lambda: 8)
    assert choose_cpu_threads(3, environ={"OMP_NUM_THREADS": "6"}, busy=7.0).threads == 3
    assert choose_cpu_threads(None, environ={"OMP_NUM_THREADS": "6"}, busy=7.0).threads == 6
    assert choose_cpu_threads(None, environ={"OMP_NUM_THREADS": "x"}, busy=7.0).threads == 1
    with pytest.raises(ValueError, match="threads=0 must be at least 1"):
        choose_cpu_threads(0, environ={})


def test_busy_cores_sees_tasks_that_started_after_the_load_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_threads.os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.40 0.30 0.20 4/210 12345\n")  # 4 runnable: this process and 3 others
    assert cli_threads.busy_cores(str(loadavg)) == 3.0
    loadavg.write_text("0.40 0.30 0.20 1/210 12345\n")
    assert cli_threads.busy_cores(str(loadavg)) == 0.4
    assert cli_threads.busy_cores(str(tmp_path / "missing")) == 0.4


def test_waiting_policy_is_set_only_before_torch_and_never_over_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"KMP_BLOCKTIME": "200"}
    assert prepare_openmp_environment(environ) == {}  # torch is loaded in this process: too late
    monkeypatch.delitem(sys.modules, "torch")
    assert prepare_openmp_environment(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"KMP_BLOCKTIME": "200", "OMP_WAIT_POLICY": "PASSIVE"}


def test_policy_before_torch_in_a_fresh_interpreter() -> None:
    """As the CLI runs it: the variables are in place when OpenMP starts, and torch uses the chosen count."""
    code = f"""
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("cli_threads", {str(SRC / "orthotune" / "cli" / "threads.py")!r})
module = importlib.util.module_from_spec(spec)
sys.modules["cli_threads"] = module
spec.loader.exec_module(module)
assert "torch" not in sys.modules
choice = module.apply_cpu_thread_policy()
import torch
print(json.dumps({{"threads": torch.get_num_threads(), "chosen": choice.threads,
                  "policy": os.environ.get("OMP_WAIT_POLICY"), "omp": os.environ.get("OMP_NUM_THREADS")}}))
"""
    environ = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "KMP_", "GOMP_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["threads"] == result["chosen"] >= 1
    assert result["policy"] == "PASSIVE" and result["omp"] == str(result["chosen"])
