"""The tests section: the suite's cuda tests in a subprocess, capped by the section's
share of the budget, summarised from pytest's output even when the cap cut it off."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

from .plan import REPO, Clock, Plan


def run_tests(plan: Plan, clock: Clock, out: pathlib.Path) -> dict:
    if not (REPO / "tests").is_dir():
        return {"status": "skipped", "note": f"no tests/ folder next to the package ({REPO})"}
    log_path = out / "gpu-check-tests.log"
    # -v: one line per test, so a run cut off by the cap still says what passed.
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", "-k", "cuda", "tests"]
    # The fuzzers' short profile: their CI profile's examples, each a compile, do not fit.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "gpu-check")}  # fmt: skip
    cap = max(10.0, min(plan.share_s["tests"], clock.left))
    clock.log(f"tests: {' '.join(cmd[2:])} (at most {cap:.0f} s)")
    with open(log_path, "w") as log:
        # Its own process group, so a timeout also ends Inductor's compile workers.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    summary = _pytest_summary(log_path.read_text(errors="replace"))
    if rc is None:
        return {"status": "timeout", "note": f"stopped after {cap:.0f} s; so far: {summary}"}
    # 5: pytest selected no test (a checkout whose tests have no cuda variants).
    return {"status": "ok" if rc in (0, 5) else "failed", "note": "no test selected" if rc == 5 else summary, "rc": rc}


def _pytest_summary(text: str) -> str:
    """pytest's last line, or, for a run cut off before it, the per-test outcomes so far."""
    if final := re.findall(r"^=+ (.*\d+ (?:passed|failed|skipped|deselected|errors?).*?) =+$", text, re.M):
        return final[-1]
    outcomes = re.findall(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text)
    return ", ".join(f"{outcomes.count(o)} {o.lower()}" for o in dict.fromkeys(outcomes)) or "no test finished"
