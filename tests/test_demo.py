"""The main job end to end on synthetic video: the trained network must beat its random init."""

from __future__ import annotations

import pytest

from dulearn import demo

# Half the demo's budget: its recipe (B=4, 128x128 crops, Adam 3e-4, bf16 where native)
# for 300 steps instead of 600, without the time limit. On a 2-core CPU with AVX512-BF16
# this trains in about 7 minutes and scores 46.3 against 44.6 for the random init (the
# demo's 600 steps: 50.2). Smaller budgets are still in the early dip below the random init
# (README, "Learning at small budgets"), so they cannot assert the direction.
RECIPE = ["--steps", "300", "--minutes", "0", "--device", "cpu", "--workers", "1", "--loader-workers", "1"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_trained_network_beats_its_random_init_on_held_out_sequences(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path), *RECIPE])
    results, run = out["results"], out["run"]
    assert run["status"] == "finished" and run["step"] == 300
    trained, init = results["trained"]["J&F-Mean"], results["random init"]["J&F-Mean"]
    assert trained > init, out["report"]
    for name in results:
        videos = sorted((tmp_path / "eval" / name.replace(" ", "-") / "videos").glob("*.mp4"))
        assert len(videos) == 6 and all(v.stat().st_size > 0 for v in videos)
    printed = capsys.readouterr().out
    assert "random init" in printed and f"{100 * trained:.1f}" in printed
    # a rerun with the same settings reuses data and run and reproduces the figures
    again = demo.main(["--out", str(tmp_path), *RECIPE])
    assert again["results"]["trained"]["J&F-Mean"] == trained
