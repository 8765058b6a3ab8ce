import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_pipeline.data import PromptSet, load_file, load_hf_dataset, load_ifeval, prompt_id, split_prompts
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import DataParams


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ifeval_has_541_prompts_with_checker_fields():
    ps = load_ifeval()
    assert len(ps.prompts) == 541
    assert set(ps.extra) == {"key", "instruction_id_list", "kwargs"}
    i = ps.extra["key"].index(1001)
    assert ps.extra["instruction_id_list"][i] == ["punctuation:no_comma"]
    assert json.loads(ps.extra["kwargs"][i]) == [{}]


def test_split_is_seeded_disjoint_sorted_and_typed():
    ps = load_ifeval()
    a = split_prompts(ps, 40, 10, 5, seed=1)
    b = split_prompts(ps, 40, 10, 5, seed=1)
    c = split_prompts(ps, 40, 10, 5, seed=2)
    assert a.train.equals(b.train) and a.test.equals(b.test) and a.val.equals(b.val)
    assert not a.train.equals(c.train)
    train, test = a.train.column("prompt_id").to_pylist(), a.test.column("prompt_id").to_pylist()
    val = a.val.column("prompt_id").to_pylist()
    assert len(train) == 25 and len(test) == 10 and len(val) == 5
    assert not set(train) & set(test) and not set(train) & set(val) and not set(val) & set(test)
    assert train == sorted(train) and test == sorted(test) and val == sorted(val)
    assert a.train.schema.field("instruction_id_list").type == pa.list_(pa.string())
    for pid, text in zip(train, a.train.column("prompt").to_pylist()):
        assert pid == prompt_id(text)
    assert a.counts == {"source_rows": 541, "duplicates_dropped": 0, "unique_prompts": 541,
                        "selected": 40, "train_prompts": 25, "val_prompts": 5, "test_prompts": 10}


def test_test_set_does_not_move_when_num_prompts_changes():
    ps = load_ifeval()
    small, large = split_prompts(ps, 30, 10, 5, seed=3), split_prompts(ps, 200, 10, 5, seed=3)
    assert small.test.equals(large.test) and small.val.equals(large.val)
    assert set(small.train.column("prompt_id").to_pylist()) <= set(large.train.column("prompt_id").to_pylist())


def test_source_order_and_duplicates_do_not_change_the_draw():
    prompts = [f"prompt number {i}" for i in range(20)]
    a = split_prompts(PromptSet("a", prompts), 10, 3, 2, seed=0)
    b = split_prompts(PromptSet("b", list(reversed(prompts)) + prompts[:5]), 10, 3, 2, seed=0)
    assert a.train.equals(b.train) and a.test.equals(b.test)
    assert b.counts["duplicates_dropped"] == 5


def test_split_errors_name_the_key():
    ps = PromptSet("src", ["a", "b", "c"])
    with pytest.raises(PipelineError, match="data.num_prompts: 5 requested but src has 3"):
        split_prompts(ps, 5, 1, 1, 0)
    with pytest.raises(PipelineError, match=r"data.test_size: 2 \+ data.val_size 1 leave no train prompts out of 3"):
        split_prompts(ps, None, 2, 1, 0)


def test_iteration_chunks_are_disjoint_seeded_and_independent_of_the_count():
    from rlhf_pipeline.iterations import iteration_number, iteration_prompts, iteration_seed

    train = split_prompts(load_ifeval(), 40, 5, 5, seed=0).train  # 30 rows
    chunks = [iteration_prompts(train, t, 10, False, 7, "train.parquet").column("prompt_id").to_pylist()
              for t in (1, 2, 3)]
    assert all(len(c) == 10 and c == sorted(c) for c in chunks)
    assert len(set().union(*chunks)) == 30  # disjoint, together the whole train set
    assert iteration_prompts(train.take(list(reversed(range(30)))), 2, 10, False, 7, "x").column(
        "prompt_id").to_pylist() == chunks[1]  # row order of the file does not matter
    assert iteration_prompts(train, 3, 10, True, 7, "x").column("prompt_id").to_pylist() == chunks[0]  # reuse
    with pytest.raises(PipelineError, match=r"train.parquet: iteration 4 needs train prompts 31..40 "
                                            r"\(data.prompts_per_iteration=10\) but there are 30"):
        iteration_prompts(train, 4, 10, False, 7, "train.parquet")
    assert iteration_seed(7, 1) == 7 and len({iteration_seed(7, t) for t in (1, 2, 3)}) == 3
    assert iteration_number("iter_12") == 12
    with pytest.raises(PipelineError, match="iteration 'iter_0'"):
        iteration_number("iter_0")


def test_jsonl_and_parquet_files(tmp_path):
    j = write_jsonl(tmp_path / "p.jsonl", [{"q": "first"}, {"q": "second", "other": 1}])
    assert load_file(j, "q").prompts == ["first", "second"]
    pq.write_table(pa.table({"q": ["x", "y"]}), tmp_path / "p.parquet")
    assert load_file(tmp_path / "p.parquet", "q").prompts == ["x", "y"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"file is empty"),
        (b"\n  \n", r"file is empty"),
        (b'{"prompt": "ok"}\n{"text": "no prompt"}\n', r"p.jsonl:2: no field 'prompt'"),
        (b'{"prompt": "ok"}\n{"prompt": "   "}\n', r"p.jsonl:2: field 'prompt' is empty"),
        (b'{"prompt": 7}\n', r"p.jsonl:1: field 'prompt' is int, expected a string"),
        (b'{"prompt": null}\n', r"p.jsonl:1: field 'prompt' is NoneType"),
        (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"p.jsonl:2: invalid UTF-8"),
        (b'{"prompt": "ok"}\n{"prompt": \n', r"p.jsonl:2: invalid JSON"),
        (b'["prompt"]\n', r"p.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        load_file(path, "prompt")


def test_bad_parquet_files(tmp_path):
    with pytest.raises(PipelineError, match="prompt file not found"):
        load_file(tmp_path / "missing.parquet", "prompt")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(PipelineError, match="file is empty"):
        load_file(tmp_path / "empty.parquet", "prompt")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(PipelineError, match="no column 'prompt'"):
        load_file(tmp_path / "nocol.parquet", "prompt")
    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(PipelineError, match="row 1: field 'prompt' is NoneType"):
        load_file(tmp_path / "null.parquet", "prompt")
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), tmp_path / "bin.parquet")
    with pytest.raises(PipelineError, match="row 1: invalid UTF-8"):
        load_file(tmp_path / "bin.parquet", "prompt")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(PipelineError, match="not a readable Parquet file"):
        load_file(tmp_path / "junk.parquet", "prompt")


def test_huggingface_source_from_local_dataset_folder(tmp_path):
    folder = tmp_path / "ultrafeedback_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": f"question {i}", "prompt_id": str(i)} for i in range(5)])
    ps = load_hf_dataset(DataParams(source="huggingface", dataset=str(folder), split="train"))
    assert ps.prompts == [f"question {i}" for i in range(5)]
    ps = load_hf_dataset(DataParams(source="huggingface", dataset="json",
                                    data_files=str(folder / "train.jsonl"), split="train"))
    assert len(ps.prompts) == 5


def test_huggingface_source_errors(tmp_path):
    with pytest.raises(PipelineError, match="data.dataset: cannot load dataset"):
        load_hf_dataset(DataParams(source="huggingface", dataset=str(tmp_path / "nothing-here")))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a"}])
    with pytest.raises(PipelineError, match="no column 'prompt'"):
        load_hf_dataset(DataParams(source="huggingface", dataset=str(folder)))


def test_folders_and_corrupt_parquet_are_named_one_line(tmp_path):
    from rlhf_pipeline.data import read_records

    (tmp_path / "demos.parquet").mkdir()
    with pytest.raises(PipelineError, match="sft.path: .* is a folder"):
        read_records(tmp_path / "demos.parquet", "sft.path")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(PipelineError, match="bad.parquet: not a readable Parquet file"):
        read_records(tmp_path / "bad.parquet", "reward_model.path")
