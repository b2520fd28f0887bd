"""Every chapter of the course runs top to bottom in smoke mode (SMOKE_TEST=1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs_in_smoke_mode(tutorial, tmp_path):
    env = dict(os.environ, SMOKE_TEST="1", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(tutorial)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 3
