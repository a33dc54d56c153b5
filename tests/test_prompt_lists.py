"""Prompt lists: the toy list, the original SD list's format, and every invalid-file error."""

import urllib.error
import urllib.request

import pytest

from helpers import prompt_lists
from helpers.paths import DATA_DIR, REPO_ROOT
from helpers.prompt_lists import (
    ORIGINAL_SD_PROMPT_FILES,
    PromptTableError,
    load_prompt_list,
    read_original_sd_prompts,
    read_prompt_table,
    resolve_prompt_file,
)

# Two files in the layout of the repository of Chen, Viégas and Wattenberg (2023): the
# columns "prompts,seeds", and in the test file an extra "prompt_inds" column. The prompts
# are made up, but the quoting cases (a comma, doubled quotes, a non-ASCII character) are
# the kinds that occur in the LAION captions.
ORIGINAL_TRAIN_CSV = (
    "prompts,seeds\n"
    '"Herders with a yak team, Big Pamir",63270105\n'
    "Gretsch G5420 Electromatic,94121136\n"
    '"""36"""" Electric Cooktop"" - Black",30918977\n'
)
ORIGINAL_TEST_CSV = (
    "prompts,seeds,prompt_inds\n"
    "Whirlpool® Smart Double Wall Oven,89624151,9229136\n"
    "Red Wattlebird,5730876,6841871\n"
)


def _write(tmp_path, text, name="prompts.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture
def original_copy(tmp_path):
    folder = tmp_path / "chen2023"
    folder.mkdir()
    _write(folder, ORIGINAL_TRAIN_CSV, ORIGINAL_SD_PROMPT_FILES["train"])
    _write(folder, ORIGINAL_TEST_CSV, ORIGINAL_SD_PROMPT_FILES["test"])
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail as it does without a network connection."""

    def refuse(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# Valid files


def test_toy_prompt_list_sizes():
    table = read_prompt_table(DATA_DIR / "toy_prompts.csv")

    assert len(table) == 617
    assert table.split_counts() == {"train": 246, "test": 371}
    assert table.extra_columns == ["scene_seed", "color", "shape", "side", "distance"]


def test_rows_have_types(tmp_path):
    path = _write(tmp_path, "prompt,seed,split,color\na red cube,7,train,red\n")

    (row,) = read_prompt_table(path).rows

    assert row == {"prompt": "a red cube", "seed": 7, "split": "train", "color": "red"}


def test_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,seed\na red cube,7\n")

    assert read_prompt_table(path).rows[0]["seed"] == 7


def test_split_column_is_optional(tmp_path):
    path = _write(tmp_path, "prompt,seed\na red cube,7\na blue cone,8\n")

    table = read_prompt_table(path)

    assert [row["split"] for row in table.rows] == ["", ""]


def test_quoted_prompt_with_comma_and_line_break(tmp_path):
    path = _write(tmp_path, 'prompt,seed\n"a red cube,\non the left",7\nsecond,8\n')

    table = read_prompt_table(path)

    assert table.rows[0]["prompt"] == "a red cube,\non the left"
    assert table.rows[1]["seed"] == 8


def test_head_takes_first_rows():
    table = read_prompt_table(DATA_DIR / "toy_prompts.csv")

    assert table.head(3).rows == table.rows[:3]
    assert table.head(None) is table


def test_head_rejects_too_many_rows(tmp_path):
    table = read_prompt_table(_write(tmp_path, "prompt,seed\na,1\n"))

    with pytest.raises(ValueError, match="only 1 rows"):
        table.head(2)


def test_relative_prompt_file_is_under_repository():
    assert resolve_prompt_file("data/toy_prompts.csv") == REPO_ROOT / "data" / "toy_prompts.csv"
    assert resolve_prompt_file("chen2023") == "chen2023"
    assert resolve_prompt_file("https://example.org/p.csv") == "https://example.org/p.csv"


def test_load_prompt_list_reads_repository_path():
    assert len(load_prompt_list("data/toy_prompts.csv")) == 617


# Invalid files: each error names the file, the row and the fix


def test_missing_column_error(tmp_path):
    path = _write(tmp_path, "prompt,split\na red cube,train\n")

    with pytest.raises(PromptTableError, match="no column 'seed'") as raised:
        read_prompt_table(path)

    assert str(path) in str(raised.value)
    assert "add a header line" in str(raised.value)


def test_non_integer_seed_error(tmp_path):
    path = _write(tmp_path, "prompt,seed\na red cube,7\na blue cone,seven\n")

    with pytest.raises(PromptTableError, match="Row 2 .*'seven'.*write the seed as digits"):
        read_prompt_table(path)


@pytest.mark.parametrize("seed", ["-1", "3.5", "", str(2**64)])
def test_invalid_seed_values(tmp_path, seed):
    path = _write(tmp_path, f"prompt,seed\na red cube,{seed}\n")

    with pytest.raises(PromptTableError, match="Row 1"):
        read_prompt_table(path)


def test_unknown_split_error(tmp_path):
    path = _write(tmp_path, "prompt,seed,split\na,1,train\nb,2,validation\n")

    with pytest.raises(PromptTableError, match="Row 2 .*'validation'.*'train', 'test'"):
        read_prompt_table(path)


def test_empty_split_in_split_column_error(tmp_path):
    path = _write(tmp_path, "prompt,seed,split\na,1,\n")

    with pytest.raises(PromptTableError, match="unknown split ''"):
        read_prompt_table(path)


def test_empty_file_error(tmp_path):
    path = _write(tmp_path, "")

    with pytest.raises(PromptTableError, match="is empty.*header line"):
        read_prompt_table(path)


def test_header_only_error(tmp_path):
    path = _write(tmp_path, "prompt,seed,split\n")

    with pytest.raises(PromptTableError, match="no rows"):
        read_prompt_table(path)


def test_too_many_fields_error(tmp_path):
    path = _write(tmp_path, "prompt,seed\na red cube, on the left,7\n")

    with pytest.raises(PromptTableError, match="Row 1 .*quote prompts"):
        read_prompt_table(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(PromptTableError, match="not found"):
        read_prompt_table(tmp_path / "missing.csv")


def test_wrong_encoding_error(tmp_path):
    path = _write(tmp_path, "prompt,seed\ncafé,1\n", encoding="latin-1")

    with pytest.raises(PromptTableError, match="not valid utf-8.*encoding="):
        read_prompt_table(path)


def test_offline_url_error(offline):
    with pytest.raises(PromptTableError, match="Could not download.*local path"):
        read_prompt_table("https://example.org/prompts.csv")


# The original Stable Diffusion probing set


def test_original_list_train_rows_first(original_copy):
    table = read_original_sd_prompts(original_copy, download=False)

    assert [row["split"] for row in table.rows] == ["train"] * 3 + ["test"] * 2
    assert [row["seed"] for row in table.rows] == [63270105, 94121136, 30918977, 89624151, 5730876]


def test_original_list_quoting(original_copy):
    table = read_original_sd_prompts(original_copy, download=False)

    assert table.rows[0]["prompt"] == "Herders with a yak team, Big Pamir"
    assert table.rows[2]["prompt"] == '"36"" Electric Cooktop" - Black'
    assert table.rows[3]["prompt"] == "Whirlpool® Smart Double Wall Oven"


def test_original_list_keeps_extra_column(original_copy):
    table = read_original_sd_prompts(original_copy, download=False)

    assert table.extra_columns == ["prompt_inds"]
    assert [row["prompt_inds"] for row in table.rows] == ["", "", "", "9229136", "6841871"]


def test_original_list_latin1_decoding(original_copy):
    table = read_original_sd_prompts(original_copy, download=False, encoding="iso-8859-1")

    # The original scripts decode as ISO-8859-1, which turns UTF-8 "®" into two characters.
    assert table.rows[3]["prompt"] == "WhirlpoolÂ® Smart Double Wall Oven"


def test_original_list_missing_without_download(tmp_path):
    with pytest.raises(PromptTableError, match="download=True"):
        read_original_sd_prompts(tmp_path, download=False)


def test_original_list_offline_error(tmp_path, offline):
    with pytest.raises(PromptTableError, match="Could not download.*raw CSV") as raised:
        read_original_sd_prompts(tmp_path / "chen2023")

    assert prompt_lists.ORIGINAL_SD_PROMPTS_BASE_URL in str(raised.value)
    assert not any((tmp_path / "chen2023").glob("*.csv"))


def test_original_list_download_writes_files(tmp_path, monkeypatch):
    files = {
        ORIGINAL_SD_PROMPT_FILES["train"]: ORIGINAL_TRAIN_CSV,
        ORIGINAL_SD_PROMPT_FILES["test"]: ORIGINAL_TEST_CSV,
    }
    requested = []

    class Response:
        def __init__(self, data):
            self.data = data

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

    def serve(url, timeout=None):
        requested.append(url)
        return Response(files[url.rsplit("/", 1)[1]].encode("utf-8"))

    monkeypatch.setattr(urllib.request, "urlopen", serve)

    table = read_original_sd_prompts(tmp_path / "chen2023", base_url="https://mirror.test/raw/")

    assert requested == [f"https://mirror.test/raw/{name}" for name in files]
    assert len(table) == 5
    assert sorted(path.name for path in (tmp_path / "chen2023").iterdir()) == sorted(files)
