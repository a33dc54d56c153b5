"""Prompt lists: which prompt and seed each generated image gets, and its probe split.

A prompt list is a CSV file with a header and the columns

- ``prompt``: the text prompt;
- ``seed``: a non-negative integer, the seed of the image's own CPU ``torch.Generator``;
- ``split`` (optional): ``train`` or ``test``, the probe split of the image. Without this
  column every row gets the empty split ``""`` and belongs to neither split.

Any other column is kept as text and copied into the run folder's ``index.csv``. The row
order defines the image ids: the first data row is image 0.

``read_prompt_table`` reads such a file from a path or an http(s) URL.
``read_original_sd_prompts`` reads the Stable Diffusion probing set of Chen, Viégas and
Wattenberg ("Beyond Surface Statistics", NeurIPS 2023): 617 LAION prompts with seeds, 246 for
training the probes and 371 for testing them, from a local copy or, when online, from the
authors' repository.
"""

import csv
import io
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers.paths import REPO_ROOT, RUNS_DIR

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
REQUIRED_COLUMNS = ("prompt", "seed")
DOWNLOAD_TIMEOUT_SECONDS = 30
# The largest seed that torch.Generator.manual_seed accepts.
MAX_SEED = 2**64 - 1

# The authors' repository, yc015/scene-representation-diffusion-model on GitHub, stores the
# probing set as two CSV files with the columns "prompts" and "seeds". Some versions add a
# "prompt_inds" column to the test file. The URL is pinned to a commit that contains both
# files, so the download cannot change.
ORIGINAL_SD_PROMPTS_BASE_URL = (
    "https://raw.githubusercontent.com/yc015/scene-representation-diffusion-model/"
    "fb8e90d8d7a735e610c5c7f5dc47031ea4ad6ac5/"
)
ORIGINAL_SD_PROMPT_FILES = {
    "train": "train_split_prompts_seeds.csv",
    "test": "test_split_prompts_seeds.csv",
}
ORIGINAL_SD_COLUMNS = {"prompt": "prompts", "seed": "seeds"}
ORIGINAL_SD_PROMPTS_DIR = RUNS_DIR / "prompt_lists" / "chen2023_sd"

# The value of a notebook's ``prompt_file`` parameter that selects the original SD probing set.
ORIGINAL_SD_PROMPT_LIST = "chen2023"


class PromptTableError(ValueError):
    """Raised when a prompt list is missing, unreadable or invalid."""


@dataclass
class PromptTable:
    """Rows of a prompt list in file order, where row ``i`` becomes image ``i``."""

    source: str
    """Path or URL that the rows were read from, recorded in the run folder's run.json."""
    rows: list[dict]
    """One dict per image: ``prompt`` (str), ``seed`` (int), ``split`` (str) and the extra
    columns (str)."""
    extra_columns: list[str]
    """Names of the columns besides prompt, seed and split, in file order."""

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, count: int | None) -> "PromptTable":
        """Return the first ``count`` rows (all rows for None) as a new table."""
        if count is None:
            return self
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive number of images or None, got {count!r}.")
        if count > len(self.rows):
            raise ValueError(
                f"Requested {count} images but the prompt list {self.source} has only "
                f"{len(self.rows)} rows: lower the number of images to at most {len(self.rows)}."
            )
        return PromptTable(self.source, self.rows[:count], self.extra_columns)

    def split_counts(self) -> dict[str, int]:
        """Count the rows per split, in the order of first appearance."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row["split"]] = counts.get(row["split"], 0) + 1
        return counts


def read_prompt_table(path_or_url: str | Path, *, encoding: str = "utf-8") -> PromptTable:
    """Read a prompt list CSV (columns prompt, seed, optional split, extras) from a path or URL.

    Raises:
        PromptTableError: the file is missing, cannot be downloaded or decoded, is empty,
            lacks a required column, or has a row with an invalid seed or an unknown split.
            The message names the file, the row and the fix.
    """
    source = str(path_or_url)
    text = _read_text(source, encoding)
    return parse_prompt_table(text, source)


def parse_prompt_table(
    text: str, source: str, column_names: dict[str, str] | None = None
) -> PromptTable:
    """Parse the text of a prompt list CSV, naming the file ``source`` in error messages.

    ``column_names`` maps the standard names ``prompt`` and ``seed`` to the file's own column
    names, for lists written with other headers.
    """
    column_names = {**{name: name for name in REQUIRED_COLUMNS}, **(column_names or {})}
    if not text.strip():
        raise PromptTableError(
            f"The prompt list {source} is empty: write a header line 'prompt,seed,split' and "
            "one row per image."
        )

    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [column_names[name] for name in REQUIRED_COLUMNS if column_names[name] not in header]
    if missing:
        raise PromptTableError(
            f"The prompt list {source} has no column {missing[0]!r} (its header is {header}): "
            f"add a header line with the columns {[column_names[n] for n in REQUIRED_COLUMNS]} "
            "and optionally 'split'."
        )
    renamed = {column_names[name] for name in REQUIRED_COLUMNS} | {"split"}
    extra_columns = [name for name in header if name not in renamed]

    rows = []
    # Line 1 is the header, so data rows start on line 2. reader.line_num would count the
    # physical lines, which differ from rows when a quoted prompt contains a line break.
    for row_number, record in enumerate(reader, start=1):
        if None in record:
            raise PromptTableError(
                f"Row {row_number} of the prompt list {source} has more fields than the header "
                f"({header}): quote prompts that contain commas."
            )
        rows.append(_parse_row(record, row_number, source, column_names, extra_columns))

    if not rows:
        raise PromptTableError(
            f"The prompt list {source} has a header but no rows: add one row per image."
        )
    return PromptTable(source=source, rows=rows, extra_columns=extra_columns)


def _parse_row(
    record: dict, row_number: int, source: str, column_names: dict, extra_columns: list[str]
) -> dict:
    prompt = record[column_names["prompt"]]
    if prompt is None:
        raise PromptTableError(
            f"Row {row_number} of the prompt list {source} has no prompt field: give every "
            "row as many fields as the header."
        )

    raw_seed = (record[column_names["seed"]] or "").strip()
    try:
        seed = int(raw_seed)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        raise PromptTableError(
            f"Row {row_number} of the prompt list {source} has the seed {raw_seed!r}, which is "
            f"not an integer from 0 to {MAX_SEED}: write the seed as digits, such as 42."
        )

    split = (record.get("split") or "").strip() if "split" in record else ""
    if "split" in record and split not in SPLITS:
        raise PromptTableError(
            f"Row {row_number} of the prompt list {source} has the unknown split {split!r}: "
            f"use one of {list(SPLITS)}, or remove the split column."
        )

    extras = {name: record[name] if record[name] is not None else "" for name in extra_columns}
    return {"prompt": prompt, "seed": seed, "split": split, **extras}


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _read_text(source: str, encoding: str) -> str:
    if _is_url(source):
        data = _download(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PromptTableError(
                f"Prompt list {path} not found: pass the path of a CSV file with the columns "
                "prompt, seed and optionally split."
            )
        data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise PromptTableError(
            f"The prompt list {source} is not valid {encoding} (byte {error.start}): pass the "
            "file's encoding, such as encoding='latin-1'."
        ) from error
    # Spreadsheet programs often start a UTF-8 CSV with a byte order mark, which would
    # otherwise become part of the first column's name.
    return text.removeprefix("\ufeff")


def _download(url: str) -> bytes:
    logger.info("Downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise PromptTableError(
            f"Could not download the prompt list {url}: {error}. Check the network "
            "connection and the URL, which must point at the raw CSV file; when offline, copy "
            "the file to this machine and pass its local path."
        ) from error


def resolve_prompt_file(prompt_file: str | Path) -> str | Path:
    """Resolve a notebook's ``prompt_file``: URLs and absolute paths stay, relative paths are
    taken from the repository root, and ``"chen2023"`` is returned as is."""
    text = str(prompt_file)
    if text == ORIGINAL_SD_PROMPT_LIST or _is_url(text):
        return text
    path = Path(prompt_file).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def load_prompt_list(prompt_file: str | Path, *, encoding: str = "utf-8") -> PromptTable:
    """Read the prompt list a notebook's ``prompt_file`` names.

    ``"chen2023"`` reads the original Stable Diffusion probing set with
    ``read_original_sd_prompts``. Anything else is a URL or a path, relative paths being
    relative to the repository root.
    """
    resolved = resolve_prompt_file(prompt_file)
    if resolved == ORIGINAL_SD_PROMPT_LIST:
        return read_original_sd_prompts(encoding=encoding)
    return read_prompt_table(resolved, encoding=encoding)


def download_original_sd_prompts(
    folder: str | Path = ORIGINAL_SD_PROMPTS_DIR, base_url: str = ORIGINAL_SD_PROMPTS_BASE_URL
) -> Path:
    """Download the two CSV files of the original SD probing set into ``folder``.

    ``base_url`` must end with "/" and point at the raw files of the authors' repository
    (or a mirror with the same file names). Files are written atomically, so an interrupted
    download leaves no partial file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ORIGINAL_SD_PROMPT_FILES.values():
        data = _download(base_url + name)
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, folder / name)
    return folder


def read_original_sd_prompts(
    folder: str | Path = ORIGINAL_SD_PROMPTS_DIR,
    *,
    download: bool = True,
    base_url: str = ORIGINAL_SD_PROMPTS_BASE_URL,
    encoding: str = "utf-8",
) -> PromptTable:
    """Read the SD probing set of Chen et al. (2023): train rows first, then test rows.

    The set is two files in ``folder`` (see ``ORIGINAL_SD_PROMPT_FILES``) with the columns
    ``prompts`` and ``seeds``. When a file is missing and ``download`` is True, both are
    downloaded from ``base_url`` first. Extra columns, such as ``prompt_inds`` in some
    versions of the test file, are kept.

    NOTE: the authors' scripts decode these files as ISO-8859-1. Pass
    ``encoding="iso-8859-1"`` to get their exact prompt strings, including any mis-decoded
    characters; the default, UTF-8, fails on a file that is not valid UTF-8.
    """
    folder = Path(folder)
    paths = {split: folder / name for split, name in ORIGINAL_SD_PROMPT_FILES.items()}
    if not all(path.is_file() for path in paths.values()):
        if not download:
            raise PromptTableError(
                f"The original SD prompt list is not in {folder} (expected "
                f"{sorted(ORIGINAL_SD_PROMPT_FILES.values())}): pass download=True, or copy "
                "the files there from the repository yc015/scene-representation-diffusion-model."
            )
        download_original_sd_prompts(folder, base_url)

    rows: list[dict] = []
    extra_columns: list[str] = []
    for split, path in paths.items():
        part = parse_prompt_table(
            _read_text(str(path), encoding), str(path), column_names=ORIGINAL_SD_COLUMNS
        )
        for name in part.extra_columns:
            if name not in extra_columns:
                extra_columns.append(name)
        rows.extend({**row, "split": split} for row in part.rows)

    # A column that only one file has is empty in the other file's rows.
    rows = [{**{name: "" for name in extra_columns}, **row} for row in rows]
    table = PromptTable(source=str(folder), rows=rows, extra_columns=extra_columns)
    logger.info("Read the original SD prompt list from %s: %s", folder, table.split_counts())
    return table
