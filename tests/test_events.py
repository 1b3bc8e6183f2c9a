"""What the library reports, as events to a callback object, and its errors: parameters in
the library's words, flags at the CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nas.cli import main


@pytest.mark.slow
def test_a_search_reports_its_trials_epochs_rejections_and_end_as_events(tmp_path):
    from nas import search
    from nas.events import (Callback, CandidateRejected, EpochEnded, SearchEnded, TrialEnded,
                            line)
    from nas.specs import load_pipeline, load_space

    seen = []

    recorder = Callback()  # every event, and every notice, in the order they came
    for method in ("on_message", "on_trial_begin", "on_epoch_end", "on_trial_end",
                   "on_candidate_rejected", "on_search_end"):
        setattr(recorder, method, seen.append)

    # Under this budget many of the tiny space's candidates are too large: rejected inside
    # the oracle, each an event with its kind.
    config = search.SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"),
                                 tuner="random", max_trials=2, epochs=2, max_params=400,
                                 experiment="events", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                                 workdir=str(tmp_path / ".nas"), ensemble=1)
    result = search.run(search.prepare(config), recorder)

    kinds = [type(e).__name__ for e in seen if not isinstance(e, str)]
    trials = [kind for kind in kinds if kind != "CandidateRejected"]
    assert trials == ["TrialStarted", "EpochEnded", "EpochEnded", "TrialEnded"] * 2 \
        + ["SearchEnded"]
    rejected = [e for e in seen if isinstance(e, CandidateRejected)]
    assert len(rejected) == result.rejected > 0
    assert {e.kind for e in rejected} <= {"max_params", "impossible"}
    assert all(e.stage is None and "> max_params 400" in e.reason
               for e in rejected if e.kind == "max_params")
    assert all(isinstance(e.stage, int) for e in rejected if e.kind == "impossible")

    ended = [e for e in seen if isinstance(e, TrialEnded)]
    assert [e.trial for e in ended] == [1, 2] and {e.trials for e in ended} == {2}
    assert all(e.status == "FINISHED" and e.params <= 400 and e.run_id for e in ended)
    assert [t.run_id for t in sorted(result.trials, key=lambda t: t.trial_id)] \
        == [e.run_id for e in ended]
    assert line(ended[0]).startswith(f"trial {ended[0].trial_id} (1/2): val_accuracy "
                                     f"{ended[0].value:.4f}  best ")
    first = [e for e in seen if isinstance(e, EpochEnded)][0]
    assert (first.epoch, first.epochs, first.trial) == (1, 2, 1)
    (end,) = [e for e in seen if isinstance(e, SearchEnded)]
    assert end.result is result


def test_a_library_error_names_the_parameter_and_the_cli_its_flag(tmp_path):
    from nas import errors, search
    from nas.specs import load_pipeline, load_space

    afile = tmp_path / "afile"
    afile.write_text("")
    config = search.SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"),
                                 workdir=str(afile / "work"))
    with pytest.raises(errors.InputError) as raised:
        search.prepare(config)
    assert str(raised.value) == f"workdir: {afile} is a file, not a folder"
    assert isinstance(raised.value, errors.NasError) and isinstance(raised.value, ValueError)

    result = CliRunner().invoke(main, ["search", "--space", "tiny", "--workdir",
                                       str(afile / "work")])
    assert result.exit_code == 2
    assert result.output == f"Error: --workdir: {afile} is a file, not a folder\n"


def test_each_event_reads_as_one_line():
    from nas.events import CandidateRejected, TrialEnded, TrialStarted, line

    assert line(TrialStarted("3", 1, 5)) == "trial 3 (1/5) starts"
    assert line(TrialStarted("3", 1, 5, resumed_at=4)) == (
        "trial 3 resumes at epoch 4 (epochs 1-3 were trained by an earlier process)")
    assert line(TrialStarted("3", 1, 5, resumed_at=2)).endswith("(epoch 1 was trained by an "
                                                                "earlier process)")
    assert line(TrialEnded("3", 2, 5, "val_loss", 0.25, 0.2, 1234, 3.04, "FINISHED")) == (
        "trial 3 (2/5): val_loss 0.2500  best 0.2000  params 1,234  3.0 s")
    assert line(TrialEnded("3", 2, 5, "val_loss", None, None, 10, 1.0, "FAILED",
                           error="ValueError: nan")) == (
        "trial 3 (2/5): val_loss FAILED  best -  params 10  1.0 s")
    assert line(CandidateRejected("impossible", "stage 2: ...", 2)) == (
        "candidate rejected (impossible): stage 2: ...")
