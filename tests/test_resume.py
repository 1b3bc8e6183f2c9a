"""A search's state file, as every version of nas wrote it, read back by this one."""

import json

import pytest

from nas import resume
from nas.errors import SearchError
from nas.settings import SearchConfig
from nas.specs import load_pipeline, load_space

# `nas_search.json` as nas wrote it before `SearchState` (a new search's, byte for byte).
WRITTEN = ('{"search_run_id": "0123abcd", "experiment_id": "1", "fingerprint": '
           '"b66f9e081c1913ff", "max_trials": 10, "data_digest": "", "data_files": 1797}')
OLDEST = '{"search_run_id": "0123abcd", "experiment_id": "1", "fingerprint": "f"}'


def config(tmp_path, **given) -> SearchConfig:
    return SearchConfig(space=load_space("tiny"), pipeline=load_pipeline("digits"),
                        experiment="kept", workdir=str(tmp_path / "work"), **given)


def saved(tmp_path, text: str):
    folder = tmp_path / "work" / "kept"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nas_search.json").write_text(text)
    return folder


def test_a_state_file_an_earlier_nas_wrote_reads_back_and_is_written_alike(tmp_path):
    state = resume.read_state(saved(tmp_path, WRITTEN))

    assert state == resume.SearchState("0123abcd", "1", "b66f9e081c1913ff", 10, "", 1797)
    assert state.to_json() == WRITTEN


def test_the_oldest_state_file_reads_back_with_what_it_lacked_unknown(tmp_path):
    state = resume.read_state(saved(tmp_path, OLDEST))

    assert (state.max_trials, state.data_digest, state.data_files) == (None, None, None)
    assert json.loads(state.to_json()) == json.loads(OLDEST)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"fingerprint": "f"}', ""])
def test_a_file_that_is_no_search_state_is_none(tmp_path, text):
    assert resume.read_state(saved(tmp_path, text)) is None


def test_a_folder_without_a_state_file_has_none(tmp_path):
    assert resume.saved_state(config(tmp_path)) is None


def test_a_state_of_other_settings_is_refused_unless_overwritten(tmp_path):
    folder = saved(tmp_path, WRITTEN)

    with pytest.raises(SearchError) as refused:
        resume.saved_state(config(tmp_path))
    assert str(refused.value) == (
        f"experiment: 'kept' already holds a search with other settings (in {folder}); pass "
        f"overwrite to start afresh, or choose another experiment")
    assert resume.saved_state(config(tmp_path, overwrite=True)).search_run_id == "0123abcd"


def test_the_same_settings_resume(tmp_path):
    fingerprint = config(tmp_path).fingerprint()
    saved(tmp_path, OLDEST.replace('"f"', json.dumps(fingerprint)))

    assert resume.saved_state(config(tmp_path)).fingerprint == fingerprint
