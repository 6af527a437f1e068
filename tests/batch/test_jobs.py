"""Jobs files -> work items: formats, line numbers, bad rows, the matrix, random seeds and labels.

No model: the engine identity is made by hand (vae_scale_factor 8), sizes are 64 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.batch.items import EngineIdentity, canonical_json, item_key
from engine.batch.jobs import MAX_IMAGES, Matrix, Plan, RowError, parse_list, parse_seeds, plan_jobs
from engine.errors import EngineError
from engine.pipeline.request import MAX_SEED, GenerationRequest
from tests.conftest import PARTI_PROMPTS

REPO = Path(__file__).resolve().parents[2]
IDENTITY = EngineIdentity("0" * 64, 8)
SMALL = Matrix(sizes=((64, 64),))


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(*rows: dict | str) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def plan(path: Path, matrix: Matrix = SMALL, stored: dict[str, int] | None = None) -> Plan:
    return plan_jobs(path, matrix, IDENTITY, stored or {})


def fatal(path: Path, matrix: Matrix = SMALL) -> str:
    with pytest.raises(EngineError) as caught:
        plan(path, matrix)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


def prompts(result: Plan) -> list[str]:
    return [item.settings["prompt"][0] for item in result.items]


# -- flags --------------------------------------------------------------------------------------


def test_parse_seeds_examples() -> None:
    assert parse_seeds("1-4") == (1, 2, 3, 4)
    assert parse_seeds("1-4,7,10-11") == (1, 2, 3, 4, 7, 10, 11)
    assert parse_seeds(" -1 ") == (-1,)
    assert parse_seeds("5, -1") == (5, -1)
    assert parse_seeds(f"{MAX_SEED}") == (MAX_SEED,)


@pytest.mark.parametrize(
    "text", ["", "a", "4-1", "-2", "1-", "1--4", "-1-3", "1;2", f"{MAX_SEED + 1}", "0-9999999"]
)
def test_parse_seeds_refuses(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_seeds(text)
    assert "\n" not in str(caught.value)


@given(st.lists(st.tuples(st.integers(0, MAX_SEED - 20), st.integers(0, 20)), min_size=1, max_size=6))
@settings(max_examples=50, deadline=None)
def test_parse_seeds_expands_ranges(ranges: list[tuple[int, int]]) -> None:
    text = ",".join(f"{low}" if span == 0 else f"{low}-{low + span}" for low, span in ranges)
    assert parse_seeds(text) == tuple(seed for low, span in ranges for seed in range(low, low + span + 1))


def test_parse_list() -> None:
    assert parse_list(" Euler a , DDIM", str) == ("Euler a", "DDIM")
    assert parse_list("5,7.5", float) == (5.0, 7.5)
    assert parse_list("20, 30", int) == (20, 30)
    for text, kind in (("a,,b", str), ("", str), ("5,x", float), ("nan", float), ("20.5", int)):
        with pytest.raises(ValueError):
            parse_list(text, kind)


# -- formats ------------------------------------------------------------------------------------


def test_every_format_gives_the_same_items(tmp_path: Path) -> None:
    """One prompt with a seed and steps, as JSONL, NDJSON, TSV and CSV: equal requests and keys."""
    texts = {
        "a.jsonl": jsonl({"prompt": "a red fox", "seed": 3, "steps": 4}),
        "a.ndjson": jsonl({"prompt": "a red fox", "seed": 3, "steps": 4}),
        "a.tsv": "Prompt\tSeed\tSteps\na red fox\t3\t4\n",
        "a.csv": "prompt,STEPS,seed\na red fox,4,3\n",
    }
    results = [plan(write(tmp_path, name, text)) for name, text in texts.items()]
    files = {(item.file, item.key, item.row) for result in results for item in result.items}
    assert len(files) == 1 and all(len(result.items) == 1 for result in results)
    assert [result.items[0].line for result in results] == [1, 1, 2, 2]  # a table's header is line 1
    item = results[0].items[0]
    assert item.file == "00000-000-a-red-fox-s3.png"
    request = GenerationRequest.from_json(item.settings)
    assert (request.seed, request.steps, request.width, request.sampler) == (3, 4, 64, "Euler a")
    assert item.key == item_key(IDENTITY, canonical_json(request.to_json()))
    txt = plan(write(tmp_path, "a.txt", "a red fox\n"), Matrix(sizes=((64, 64),), seeds=(3,), steps=(4,)))
    assert [(i.file, i.key) for i in txt.items] == [(item.file, item.key)]


def test_partiprompts(tmp_path: Path) -> None:
    result = plan(PARTI_PROMPTS)
    assert len(result.items) == 1632 and not result.errors
    assert len({item.file for item in result.items}) == 1632
    assert [item.row for item in result.items[:2]] == ["00000", "00001"]
    assert prompts(result)[:2] == ["bond", "element"] and result.items[0].line == 2
    assert any('"Fly an airplane"' in prompt for prompt in prompts(result))  # quotes stay text
    assert len(result.seeds) == 1632  # one random base seed per row, returned for storing
    again = plan(PARTI_PROMPTS, stored=result.seeds)
    assert [item.key for item in again.items] == [item.key for item in result.items]


@pytest.mark.parametrize("name", ["a.jsonl", "a.txt", "a.tsv", "a.csv"])
def test_bom_crlf_and_blank_lines(tmp_path: Path, name: str) -> None:
    rows = ["it's a \"quoted\" 'cat'", "dog"]
    if name.endswith(".jsonl"):
        lines = [json.dumps({"prompt": rows[0]}), "", "  ", json.dumps({"prompt": rows[1]})]
    elif name.endswith(".txt"):
        lines = [rows[0], "", "  ", rows[1]]
    elif name.endswith(".tsv"):
        lines = ["Prompt\tNote", "", f"{rows[0]}\tx", "\t", rows[1] + "\t"]
    else:
        lines = ["Prompt,Note", "", '"it\'s a ""quoted"" \'cat\'",x', ",", "dog,"]
    path = write(tmp_path, name, "\ufeff" + "\r\n".join(lines) + "\r\n")
    result = plan(path, Matrix(sizes=((64, 64),), seeds=(1,)))
    assert prompts(result) == rows and not result.errors
    expected_lines = [1, 4] if name.endswith((".jsonl", ".txt")) else [3, 5]
    assert [item.line for item in result.items] == expected_lines
    assert [item.row for item in result.items] == ["00000", "00001"]  # blank lines are not rows


def test_txt_lines_are_literal(tmp_path: Path) -> None:
    lines = ["a cat's hat", 'the word "PEACE"', "$HOME `ls` \\n -- --steps 5", "  padded  "]
    result = plan(write(tmp_path, "p.txt", "\n".join(lines)))
    assert prompts(result) == [*lines[:3], "padded"]
    assert all(item.settings["steps"] == 20 for item in result.items)


def test_csv_quoted_newline_keeps_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", 'Prompt,Seed\n"two\nlines",1\n"a, b",2\nbroken"quote,3\nlast,4\n')
    result = plan(path)
    assert prompts(result) == ["two\nlines", "a, b", 'broken"quote', "last"]
    assert [(item.line, item.settings["seed"]) for item in result.items] == [(2, 1), (4, 2), (5, 3), (6, 4)]


def test_malformed_table_rows_do_not_shift_columns(tmp_path: Path) -> None:
    text = "Prompt\tSeed\tNote\none\t1\tx\ntwo\t2\tx\textra\nthree\t3\nfour\t4\tx\n"
    result = plan(write(tmp_path, "a.tsv", text))
    assert [(item.line, item.row, item.settings["seed"]) for item in result.items] == [
        (2, "00000", 1),
        (5, "00003", 4),
    ]
    assert [(error.line, error.row) for error in result.errors] == [(3, "00001"), (4, "00002")]
    assert "4 fields where the header has 3" in result.errors[0].error
    csv_text = 'Prompt,Seed\none,1\n"bad"x,2\nthree,3\n"never closed,4\nfive,5\n'
    result = plan(write(tmp_path, "a.csv", csv_text))
    assert [(item.line, item.settings["seed"]) for item in result.items] == [(2, 1), (4, 3)]
    assert [error.line for error in result.errors] == [3, 5] and "bad CSV" in result.errors[0].error


def test_table_columns(tmp_path: Path) -> None:
    """Known headers are used case- and space-insensitively; bad numbers are row errors."""
    text = (
        "Category\tPROMPT\tNegative Prompt\tCFG Scale\tsampler_name\tid\tSize\n"
        "Animals\ta fox\tblurry\t5\tddim\tfox\t64x128\n"
        "Animals\ta cat\t\tfive\t\t\t\n"
    )
    result = plan(write(tmp_path, "a.tsv", text))
    (item,) = result.items
    settings_ = item.settings
    assert settings_["negative_prompt"] == ["blurry"] and settings_["guidance_scale"] == 5.0
    assert (settings_["sampler"], settings_["width"], settings_["height"]) == ("DDIM", 64, 128)
    assert item.row == "fox" and item.file.startswith("fox-000-a-fox-s")
    (error,) = result.errors
    assert (
        (error.line, error.row) == (3, "00001") and "guidance_scale" in error.error and "five" in error.error
    )
    assert RowError(3, "00001", "x").to_json() == {"line": 3, "row": "00001", "error": "x"}
    assert plan(write(tmp_path, "b.csv", "Prompts,Category\na fox,Animals\n")).items  # DrawBench's header


# -- bad rows and fatal errors ------------------------------------------------------------------


def test_bad_rows_are_row_errors(tmp_path: Path) -> None:
    rows = [
        {"prompt": "good", "seed": 1},
        '{"prompt": "bad json",',
        {"prompt": "x", "colour": "red"},
        {"prompt": "x", "sampler": "Bogus a"},
        {"prompt": "x", "width": 60},
        {"prompt": "x", "size": "64x100"},
        {"prompt": "x", "size": "big"},
        {"prompt": "x", "image": "iVBOR..."},
        {"prompt": ""},
        {"negative_prompt": "x"},
        ["a list"],
        {"prompt": "x", "steps": 0},
        {"prompt": "x", "steps": "5"},
        {"prompt": "x", "seed": MAX_SEED, "n": 2},
        {"prompt": "x", "cfg": 5, "guidance_scale": 6},
        {"prompt": "x", "n": MAX_IMAGES + 1},
        {"prompt": "good", "seed": 2},
    ]
    result = plan(write(tmp_path, "a.jsonl", jsonl(*rows)))
    assert [(item.line, item.row) for item in result.items] == [(1, "00000"), (17, "00016")]
    errors = {error.line: error.error for error in result.errors}
    assert list(errors) == list(range(2, 17))
    assert all("\n" not in error for error in errors.values())
    assert errors[2].startswith("bad JSON")
    assert "'colour'" in errors[3] and "valid fields: prompt," in errors[3]
    assert "unknown sampler 'Bogus a'" in errors[4]
    assert errors[5] == "width must be a multiple of 8, got 60"
    assert errors[6] == "height must be a multiple of 8, got 100"
    assert "WIDTHxHEIGHT" in errors[7] and "img2img is not supported" in errors[8]
    assert "prompt" in errors[9] and "no prompt" in errors[10] and "JSON object" in errors[11]
    assert errors[12].startswith("steps must be an integer in 1..") and "integer" in errors[13]
    assert f"0..{MAX_SEED - 1}" in errors[14] and "both set guidance_scale" in errors[15]
    assert str(MAX_IMAGES) in errors[16]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("a.json", "{}", "unknown type '.json'"),
        ("a.yaml", "x", "unknown type"),
        ("a.txt", b"caf\xe9\n", "not UTF-8 text (line 1"),
        ("a.tsv", "Text\tCategory\nx\ty\n", "no 'Prompt' column"),
        ("a.csv", "Prompt,Image\nx,y\n", "img2img is not supported"),
        ("a.csv", "Prompt,cfg,CFG Scale\nx,1,2\n", "both set guidance_scale"),
        ("a.txt", "", "has no rows"),
        ("a.jsonl", "\r\n  \n\n", "has no rows"),
        ("a.tsv", "\ufeffPrompt\tNote\r\n\r\n", "has no rows"),
    ],
)
def test_fatal_errors(tmp_path: Path, name: str, content: str | bytes, words: str) -> None:
    assert words in fatal(write(tmp_path, name, content))


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in fatal(tmp_path / "none.jsonl")
    assert "unknown type (no suffix)" in fatal(write(tmp_path, "dir.txt", "x").parent)
    (tmp_path / "d.txt").mkdir()
    assert "is a folder" in fatal(tmp_path / "d.txt")


@pytest.mark.parametrize(
    ("matrix", "words"),
    [
        (Matrix(samplers=("Euler a", "Nope")), "--samplers: unknown sampler 'Nope'"),
        (Matrix(sizes=((64, 60),)), "--size: height must be a multiple of 8"),
        (Matrix(cfg=(-1.0,)), "--cfg: guidance_scale"),
        (Matrix(steps=(0,)), "--steps: steps"),
        (Matrix(seeds=(-2,)), "--seeds"),
        (Matrix(seeds=(MAX_SEED,), images=2), "--seeds"),
        (Matrix(images=0), "--images"),
        (Matrix(clip_skip=13), "--clip-skip"),
    ],
)
def test_bad_flags_are_fatal(tmp_path: Path, matrix: Matrix, words: str) -> None:
    assert words in fatal(write(tmp_path, "a.txt", "x\n"), matrix)


# -- matrix -------------------------------------------------------------------------------------


def test_matrix_order_and_images(tmp_path: Path) -> None:
    matrix = Matrix(
        seeds=(1, 10), samplers=("Euler a", "DDIM"), cfg=(5.0, 7.5), steps=(2, 3), sizes=((64, 64), (64, 128))
    )
    result = plan(write(tmp_path, "a.txt", "a fox\n"), matrix)
    got = [
        ((s["width"], s["height"]), s["steps"], s["sampler"], s["guidance_scale"], s["seed"])
        for s in (item.settings for item in result.items)
    ]
    expected = [
        (size, steps, sampler, cfg, seed)
        for size in ((64, 64), (64, 128))
        for steps in (2, 3)
        for sampler in ("Euler a", "DDIM")
        for cfg in (5.0, 7.5)
        for seed in (1, 10)
    ]
    assert got == expected
    assert [item.image for item in result.items] == list(range(32))
    assert len({item.key for item in result.items}) == 32 and not result.seeds
    assert result.items[5].file == "00000-005-a-fox-s10.png"


def test_row_fields_win_over_flags(tmp_path: Path) -> None:
    matrix = Matrix(
        seeds=(1, 2),
        samplers=("Euler a", "DDIM"),
        cfg=(5.0, 7.5),
        steps=(2, 3),
        sizes=((64, 64), (128, 64)),
        negative_prompt="flag negative",
        images=2,
        clip_skip=2,
    )
    rows = [
        {"prompt": "own", "seed": 7, "sampler_name": "euler", "cfg_scale": 3, "steps": 4, "n": 1},
        {"prompt": "own", "width": 96, "negative_prompt": "", "clip_skip": 1, "guidance_rescale": 0.5},
        {"prompt": "flags"},
    ]
    result = plan(write(tmp_path, "a.jsonl", jsonl(*rows)), matrix)
    by_row = {row: [item.settings for item in result.items if item.row == row] for row in ("00000", "00001")}
    # Row 0 sets everything but the size: the two sizes remain.
    assert [
        (s["width"], s["steps"], s["sampler"], s["guidance_scale"], s["seed"]) for s in by_row["00000"]
    ] == [
        (64, 4, "Euler", 3.0, 7),
        (128, 4, "Euler", 3.0, 7),
    ]
    assert {(s["negative_prompt"][0], s["clip_skip"]) for s in by_row["00000"]} == {("flag negative", 2)}
    # Row 1 sets the width: the sizes differing only in width become one; n = 2 from the flag.
    row1 = by_row["00001"]
    assert len(row1) == 2 * 2 * 2 * 2 * 2 and {(s["width"], s["height"]) for s in row1} == {(96, 64)}
    assert {(s["negative_prompt"][0], s["clip_skip"], s["guidance_rescale"]) for s in row1} == {("", 1, 0.5)}
    assert [s["seed"] for s in row1[:4]] == [1, 2, 2, 3]  # seed 1: 1, 2; seed 2: 2, 3 (n = 2 each)
    assert len([item for item in result.items if item.row == "00002"]) == 2 * 2 * 2 * 2 * 2 * 2


def test_defaults_without_flags(tmp_path: Path) -> None:
    result = plan(write(tmp_path, "a.jsonl", jsonl({"prompt": "x"})), Matrix())
    (item,) = result.items
    s = item.settings
    assert (s["steps"], s["width"], s["height"], s["guidance_scale"], s["sampler"]) == (
        20,
        512,
        512,
        7.5,
        "Euler a",
    )
    assert (s["batch_size"], s["clip_skip"], s["negative_prompt"]) == (1, 1, [""])
    assert list(result.seeds.values()) == [s["seed"]]


# -- random seeds -------------------------------------------------------------------------------


def test_random_seed_with_n_is_one_base_stored_and_reused(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a.jsonl", jsonl({"prompt": "x", "seed": -1, "n": 4}, {"prompt": "y", "seed": None})
    )
    first = plan(path)
    seeds = [item.settings["seed"] for item in first.items]
    base = seeds[0]
    assert seeds[:4] == [base, base + 1, base + 2, base + 3] and len(set(seeds[:4])) == 4
    assert sorted(first.seeds.values()) == sorted([base, seeds[4]])
    assert len({item.file for item in first.items}) == 5
    again = plan(path, stored=first.seeds)
    assert again.items == first.items and again.seeds == first.seeds
    fresh = plan(path)  # nothing stored: new random bases (two equal 32-bit draws: ~2**-31)
    assert fresh.seeds.keys() == first.seeds.keys() and fresh.seeds != first.seeds


def test_random_seeds_survive_inserted_rows_and_equal_rows_differ(tmp_path: Path) -> None:
    rows = [{"prompt": "a fox", "seed": -1}, {"prompt": "a fox", "seed": -1}, {"prompt": "fruit", "seed": -1}]
    first = plan(write(tmp_path, "a.jsonl", jsonl(*rows)))
    seeds = [item.settings["seed"] for item in first.items]
    assert len(set(seeds)) == 3  # two equal rows still draw their own seeds
    edited = plan(write(tmp_path, "b.jsonl", jsonl({"prompt": "new", "seed": 1}, *rows)), stored=first.seeds)
    assert [item.settings["seed"] for item in edited.items[1:]] == seeds  # rows below keep their seeds
    assert [item.key for item in edited.items[1:]] == [item.key for item in first.items]


def test_random_seed_positions_and_range(tmp_path: Path) -> None:
    path = write(tmp_path, "a.txt", "x\n")
    result = plan(path, Matrix(sizes=((64, 64),), seeds=(-1, 5, -1), images=2, samplers=("Euler a", "DDIM")))
    seeds = [item.settings["seed"] for item in result.items]
    assert len(result.seeds) == 2 and seeds[2:4] == [5, 6]
    assert seeds[:6] == seeds[6:]  # the same seeds for every sampler, as A1111's X/Y/Z plot
    stored = dict.fromkeys(result.seeds, MAX_SEED - 1)  # the top base that still fits n = 2
    pinned = plan(path, Matrix(sizes=((64, 64),), seeds=(-1, 5, -1), images=2), stored)
    assert [item.settings["seed"] for item in pinned.items] == [
        MAX_SEED - 1,
        MAX_SEED,
        5,
        6,
        MAX_SEED - 1,
        MAX_SEED,
    ]
    out_of_range = dict.fromkeys(result.seeds, MAX_SEED)  # base + 1 would overflow: a new base is drawn
    redrawn = plan(path, Matrix(sizes=((64, 64),), seeds=(-1, 5, -1), images=2), out_of_range)
    assert all(base <= MAX_SEED - 1 for base in redrawn.seeds.values())


def test_editing_one_row_changes_only_its_keys(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt {i}", "n": 2} for i in range(4)]
    first = plan(write(tmp_path, "a.jsonl", jsonl(*rows)))
    rows[2] = {"prompt": "prompt 2", "n": 2, "steps": 3}
    second = plan(write(tmp_path, "a.jsonl", jsonl(*rows)), stored=first.seeds)
    changed = {a.row for a, b in zip(first.items, second.items, strict=True) if a.key != b.key}
    same_files = [a.file == b.file for a, b in zip(first.items, second.items, strict=True)]
    assert changed == {"00002"} and same_files == [True] * 4 + [False] * 2 + [True] * 2
    rows[1] = '{"prompt": broken'  # a bad row keeps its index: later rows are not renamed
    third = plan(write(tmp_path, "a.jsonl", jsonl(*rows)), stored=second.seeds)
    assert [item.row for item in third.items] == ["00000"] * 2 + ["00002"] * 2 + ["00003"] * 2
    assert {item.key for item in third.items} <= {item.key for item in second.items}


def test_keys_do_not_depend_on_file_order(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "seed": i if i % 2 else -1} for i in range(5)]
    first = plan(write(tmp_path, "a.jsonl", jsonl(*rows)))
    second = plan(write(tmp_path, "b.jsonl", jsonl(*reversed(rows))), stored=first.seeds)
    assert {(i.row, i.file, i.key) for i in first.items} == {(i.row, i.file, i.key) for i in second.items}
    assert [item.row for item in second.items] == ["r4", "r3", "r2", "r1", "r0"]


# -- labels and files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "lines"),
    [
        ([{"prompt": "a", "id": "Cat 1"}, {"prompt": "b", "id": "cat-1"}], "lines 1 and 2"),
        ([{"prompt": "a", "id": 7}, {"prompt": "b", "id": "7"}], "lines 1 and 2"),
        ([{"prompt": "a"}, {"prompt": "b"}, "", {"prompt": "c", "id": "00001"}], "lines 2 and 4"),
    ],
)
def test_id_collisions_are_fatal(tmp_path: Path, rows: list, lines: str) -> None:
    message = fatal(write(tmp_path, "a.jsonl", jsonl(*rows)))
    assert lines in message and "distinct ids" in message


def test_same_request_twice_gives_two_files_one_key(tmp_path: Path) -> None:
    result = plan(write(tmp_path, "a.txt", "a fox\na fox\n"), Matrix(sizes=((64, 64),), seeds=(3,)))
    first, second = result.items
    assert first.key == second.key and first.file != second.file
    assert (first.file, second.file) == ("00000-000-a-fox-s3.png", "00001-000-a-fox-s3.png")


_IDS = st.one_of(st.text(max_size=12), st.integers(-5, 10**6))


@given(ids=st.lists(_IDS, min_size=1, max_size=6), prompt=st.text(min_size=1, max_size=30))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_ids_give_unique_safe_files_or_one_error(tmp_path: Path, ids: list, prompt: str) -> None:
    rows = [{"prompt": prompt + "x", "id": row_id, "seed": 1} for row_id in ids]
    path = write(tmp_path, "h.jsonl", jsonl(*rows))
    try:
        result = plan(path)
    except EngineError as error:
        assert "\n" not in str(error) and "distinct ids" in str(error)
        return
    files = [item.file for item in result.items]
    assert len(set(files)) == len(files)
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.") for name in files)
    assert len(files) + len(result.errors) == len(rows)  # an empty id is a row error, not a crash
