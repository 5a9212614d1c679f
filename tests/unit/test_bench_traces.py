"""Public-trace loaders of the serving benchmark (Mooncake JSONL, Azure CSV): equal hash ids
give identical token blocks, lengths are kept, bad rows are refused naming their line."""

import json

import pytest

from proxy.bench.traces import load_azure, load_mooncake, load_workload
from proxy.bench.workload import PromptBuilder, WorkloadError, load_jsonl, save_jsonl
from proxy.wire.text import char_block_ids

ROWS = [
    {"timestamp": 1000, "input_length": 1200, "output_length": 40, "hash_ids": [0, 1, 2]},
    {"timestamp": 1500, "input_length": 1500, "output_length": 3, "hash_ids": [0, 1, 7]},
    {"timestamp": 1250, "input_length": 600, "output_length": 16, "hash_ids": [9, 0]},
]


def mooncake(tmp_path, rows, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tokens(text):
    return char_block_ids(text, 4)


def test_equal_hash_ids_give_equal_token_blocks(tmp_path):
    reqs = load_mooncake(mooncake(tmp_path, ROWS), token_scale=16)  # block = 512 / 16 = 32 tokens
    assert [r.hash_ids for r in reqs] == [(0, 1, 2), (9, 0), (0, 1, 7)]  # by arrival
    assert {r.block_tokens for r in reqs} == {32}
    builder = PromptBuilder(seed=3)
    a, b, c = (tokens(builder.text(r, k)) for k, r in enumerate(reqs))
    assert len(a) == 75 and len(b) == 38 and len(c) == 94  # 1200/16, 600/16 (37.5 -> 38), 1500/16 (93.75)
    assert a[:64] == c[:64]                 # blocks 0 and 1 shared
    assert a[64:75] != c[64:75]             # block 2 vs 7
    assert b[32:38] == a[:6]                # block 0 at another position: the same tokens
    assert b[:32] != a[:32]
    # the same request built twice, or by another builder with the same seed, is the same text
    assert tokens(PromptBuilder(seed=3).text(reqs[2], 2)) == c


def test_lengths_are_kept_at_scale_one_and_arrivals_start_at_zero(tmp_path):
    reqs = load_mooncake(mooncake(tmp_path, ROWS), token_scale=1, block_tokens=512)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs] == [
        (0.0, 1200, 40), (0.25, 600, 16), (0.5, 1500, 3)]
    text = PromptBuilder().text(reqs[2], 0)
    assert len(tokens(text)) == 1500 and len(text) == 4 * 1500


def test_block_tokens_option_and_max_len_cut(tmp_path):
    reqs = load_mooncake(mooncake(tmp_path, ROWS), token_scale=16, block_tokens=8)
    assert reqs[0].block_tokens == 8
    a, c = (tokens(PromptBuilder().text(r, k)) for k, r in ((0, reqs[0]), (2, reqs[2])))
    assert a[:16] == c[:16] and a[16:24] != c[16:24]   # two shared blocks of 8, then 2 vs 7
    assert a[24:] != c[24:75]                           # past the named blocks: unique tokens
    cut = load_mooncake(mooncake(tmp_path, ROWS), token_scale=16, max_len=60)
    assert [(r.prompt_tokens, r.output_tokens, r.hash_ids) for r in cut] == [
        (57, 3, (0, 1)), (38, 1, (9, 0)), (59, 1, (0, 1))]  # prompt + output <= 60, leading blocks kept


def test_mooncake_roundtrips_through_the_project_format(tmp_path):
    reqs = load_mooncake(mooncake(tmp_path, ROWS))
    path = tmp_path / "saved.jsonl"
    save_jsonl(reqs, path)
    assert load_jsonl(path) == reqs
    assert load_workload(path) == reqs                        # the project's format
    assert load_workload(mooncake(tmp_path, ROWS)) == reqs    # detected as Mooncake


@pytest.mark.parametrize("row, needle", [
    ('{"timestamp": 1, "input_length": 5, "output_length": 2}', "line 2: missing field(s) hash_ids"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 2, "hash_ids": []}', "line 2: field 'timestamp'"),
    ('{"timestamp": 1, "input_length": 0, "output_length": 2, "hash_ids": []}', "line 2: field 'input_length'"),
    ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": [1, -2]}', "line 2: field 'hash_ids'"),
    ('{"timestamp": 1, "input_length": 5, "output_length": "2", "hash_ids": [1]}', "line 2: field 'output_length'"),
    ('{"timestamp": 1, "input_length": 5,', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: a Mooncake row must be a JSON object"),
])
def test_bad_mooncake_rows_name_their_line(tmp_path, row, needle):
    path = mooncake(tmp_path, [ROWS[0], row])
    with pytest.raises(WorkloadError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_mooncake(path)


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:05.5,110,27
"""


def test_azure_csv_lengths_and_arrivals(tmp_path):
    path = tmp_path / "code.csv"
    path.write_text(AZURE)
    reqs = load_azure(path, token_scale=1)
    assert [(round(r.arrival_s, 7), r.prompt_tokens, r.output_tokens) for r in reqs] == [
        (0.0, 4808, 10), (0.052, 3180, 8), (1.52004, 110, 27)]
    assert all(not r.hash_ids for r in reqs)
    assert [(r.prompt_tokens, r.output_tokens) for r in load_workload(path)] == [(301, 1), (199, 1), (7, 2)]  # 4808/16 = 300.5 rounds up


@pytest.mark.parametrize("line, needle", [
    ("2023-11-16 18:17:04,abc,8", "line 3: ContextTokens must be an integer >= 1, got 'abc'"),
    ("2023-11-16 18:17:04,10,0", "line 3: GeneratedTokens must be an integer >= 1, got '0'"),
    ("16/11/2023 18:17,10,5", "line 3: TIMESTAMP must look like"),
    ("2023-11-16 18:17:04,10", "line 3: expected 3 columns"),
])
def test_bad_azure_rows_name_their_line(tmp_path, line, needle):
    path = tmp_path / "bad.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,1,1\n" + line + "\n")
    with pytest.raises(WorkloadError, match=needle):
        load_azure(path)


def test_azure_header_is_checked(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("time,in,out\n2023-11-16 18:17:03.9,1,1\n")
    with pytest.raises(WorkloadError, match="line 1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_azure(path)


def test_committed_development_windows_load():
    moon = load_workload("proxy/bench/data/mooncake_conversation_1200.jsonl", max_len=4096)
    azure = load_workload("proxy/bench/data/azure_code_3000.csv", max_len=4096)
    assert len(moon) == 1200 and len(azure) == 3000
    assert all(r.prompt_tokens + r.output_tokens <= 4096 for r in moon)
    assert all(r.hash_ids and r.hash_ids[0] == 0 for r in moon)  # every conversation row opens with block 0
