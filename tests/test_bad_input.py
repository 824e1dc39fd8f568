"""Bad input, bad config and hostile files: each case ends in its documented outcome (one line ``keplm <job>:
error: …`` and exit 2, or a counted reject with the rest of the output intact), never a traceback, a hang or a
half-trusted output (issue 30)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

# --- checkpoints: state.pt is read with weights_only=True ------------------------------------------------------

MARK = Path("/tmp/keplm-bad-input-pickle-ran")


class _Planted:
    """A pickled object whose unpickling would run code (here: touch a file)."""

    def __reduce__(self):
        return (Path.touch, (MARK,))


def _real_state():
    import collections

    import numpy as np
    import torch
    from transformers import get_linear_schedule_with_warmup

    from keplm.platform.train_loop import collate_stats

    m = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(m.parameters())
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()

    class Collate:
        stats = collections.Counter(samples=np.int64(4), tokens=7)

    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 1, "epoch": 0, "position": 1,
            "torch_rng": [torch.get_rng_state()], "collate_rng": [np.random.default_rng([0, 1]).bit_generator.state],
            "collate_stats": [collate_stats(Collate())], "world": 1}


def test_checkpoint_state_loads_weights_only(tmp_path):
    import torch

    from keplm.platform.train_loop import load_train_state

    state = _real_state()
    torch.save(state, tmp_path / "state.pt")
    back = load_train_state(tmp_path / "state.pt")
    assert back["collate_stats"] == [{"samples": 4, "tokens": 7}]
    assert back["collate_rng"][0] == state["collate_rng"][0]
    assert torch.equal(back["torch_rng"][0], state["torch_rng"][0])


def test_checkpoint_state_with_a_planted_object_is_refused(tmp_path):
    import torch

    from keplm.platform.train_loop import load_train_state

    MARK.unlink(missing_ok=True)
    torch.save({**_real_state(), "extra": _Planted()}, tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_train_state(tmp_path / "state.pt")
    assert not MARK.exists()
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Planted()))   # a bare pickle, not even a torch file
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_train_state(tmp_path / "raw.pt")
    assert not MARK.exists()


def test_no_torch_load_without_weights_only():
    import re

    root = Path(__file__).resolve().parents[1] / "keplm"
    for f in root.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", f.read_text()):
            assert "weights_only=True" in call, f"{f}: {call}"
