"""The main job end to end on synthetic video, with a small budget: training must help."""

from __future__ import annotations

import pytest

from dulearn import demo

SMALL = ["--steps", "100", "--minutes", "0", "--batch-size", "4", "--crop", "64", "--lr", "3e-4",
         "--videos", "16", "--frames", "24", "--train-size", "160x160",
         "--eval-sequences", "4", "--eval-frames", "16", "--eval-size", "192x192",
         "--device", "cpu", "--workers", "1", "--loader-workers", "1"]


@pytest.mark.slow
def test_trained_network_beats_its_random_init_on_held_out_sequences(tmp_path, capsys):
    out = demo.main(["--out", str(tmp_path), *SMALL])
    results, run = out["results"], out["run"]
    assert run["status"] == "finished" and run["step"] == 100
    trained, init = results["trained"]["J&F-Mean"], results["random init"]["J&F-Mean"]
    assert trained > init, out["report"]
    for name in results:
        videos = sorted((tmp_path / "eval" / name.replace(" ", "-") / "videos").glob("*.mp4"))
        assert len(videos) == 4 and all(v.stat().st_size > 0 for v in videos)
    printed = capsys.readouterr().out
    assert "random init" in printed and f"{100 * trained:.1f}" in printed
    # a rerun with the same settings reuses data and run and reproduces the figures
    again = demo.main(["--out", str(tmp_path), *SMALL])
    assert again["results"]["trained"]["J&F-Mean"] == trained
