"""The needle model: the task's layout, and retrieval past the trained length (CI's reduced check).

The reduced check is 16x the trained length (8192 tokens), 10 needles spread over the middle
of the haystack: ReAttention must find >= 90% of them, dense RoPE <= 30% (docs/design.md section 6).
"""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from reattention import needle

MIDDLE = [0.1 + 0.8 * i / 9 for i in range(10)]  # needles outside the sink and the window


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The model runs in 240-token chunks: ops too small to gain from a second thread, and
    # threads that spin at every barrier slow ~5x when the CI machine is busy elsewhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return needle.load_model()[0]


@pytest.mark.parametrize("length,depth", [(64, 0.0), (512, 0.37), (1000, 1.0), (4099, 0.5)])
def test_make_sample_layout(length, depth):
    ids, answer = needle.make_sample(length, depth, seed=3)
    again, _ = needle.make_sample(length, depth, seed=3)
    assert torch.equal(ids, again)
    assert ids.shape == (length,) and ids.dtype == torch.long and answer.shape == (4,)
    assert ids[0] == needle.BOS
    start = (ids == needle.KEY).nonzero().flatten().tolist()
    assert start == [1 + round(depth * (length - 1 - needle.QUESTION_LEN - needle.NEEDLE_LEN))]
    s = start[0]
    keys = ids[s + 1 : s + 1 + needle.KEY_LEN]
    assert ids[s + 1 + needle.KEY_LEN] == needle.VAL
    values = ids[s + needle.NEEDLE_LEN - needle.VALUE_LEN : s + needle.NEEDLE_LEN]
    assert torch.equal(values, answer)
    assert torch.equal(ids[-needle.QUESTION_LEN:],
                       torch.cat([torch.tensor([needle.QUERY]), keys, torch.tensor([needle.VAL])]))
    # Filler is content only: the markers occur in the needle and the question alone.
    assert int((ids < needle.FIRST_CONTENT).sum()) == 1 + 2 + 2


def test_make_sample_distractors_have_other_keys():
    ids, _ = needle.make_sample(2048, 0.5, seed=1, distractors=5)
    starts = (ids == needle.KEY).nonzero().flatten().tolist()
    assert len(starts) == 6
    keys = {tuple(ids[s + 1 : s + 1 + needle.KEY_LEN].tolist()) for s in starts}
    assert len(keys) == 6
    with pytest.raises(ValueError, match="depth"):
        needle.make_sample(512, 1.5, seed=0)


def test_make_batch_labels_are_the_asked_values():
    g = torch.Generator().manual_seed(0)
    ids, labels = needle.make_batch(6, 512, g, max_pairs=8)
    assert ids.shape == labels.shape == (6, 512)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        pairs = {}  # key -> (position, values)
        for i, t in enumerate(row):
            if t == needle.KEY:
                pairs[tuple(row[i + 1 : i + 3])] = (i, row[i + 4 : i + 8])
        asked = [i for i, t in enumerate(row) if t == needle.QUERY]
        assert 1 <= len(pairs) == len(asked) <= 8
        for i in asked:
            where, values = pairs[tuple(row[i + 1 : i + 3])]
            assert where < i
            assert lab[i + 4 : i + 8] == values == row[i + 4 : i + 8]
        assert sum(x != -100 for x in lab) == 4 * len(asked)


def test_trained_length_dense_and_reattention_agree_with_the_answer(model):
    res = needle.evaluate(model, [512], [0.0, 0.5, 1.0], samples=2,
                          methods=["dense", "reattention-max"], batch=6)
    assert res["accuracy"]["dense"] == [[1.0, 1.0, 1.0]]
    assert res["accuracy"]["reattention-max"] == [[1.0, 1.0, 1.0]]


def test_needle_16x_reattention_finds_it_dense_does_not(model):
    res = needle.evaluate(model, [16 * needle.TRAINED_LENGTH], MIDDLE, samples=1,
                          methods=["dense", "reattention-max"], batch=5)
    acc = {m: sum(res["accuracy"][m][0]) / len(MIDDLE) for m in res["methods"]}
    assert acc["reattention-max"] >= 0.9, acc
    assert acc["dense"] <= 0.3, acc


def test_tiered_cache_answers_exactly_as_the_all_in_memory_one(model):
    """offload="cpu" (sink 16, chunk 32: pages of 16 tokens, two per chunk) gives the same
    logits, so the same answers, as the contiguous cache at 16x the trained length."""
    from reattention.needle.model import answer, use_method
    ids = torch.stack([needle.make_sample(16 * needle.TRAINED_LENGTH, d, seed=7)[0]
                       for d in (0.2, 0.7)])
    with use_method(model, "reattention-bound"):
        want = answer(model, "reattention-bound", ids, chunk_size=1000)
        got = answer(model, "reattention-bound", ids, chunk_size=1000, offload="cpu")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rep 'bound' or 'mean'"):
        with use_method(model, "reattention-max"):
            answer(model, "reattention-max", ids, offload="cpu")


def test_window_sees_the_sink_and_the_window_only(model):
    res = needle.evaluate(model, [4096], [0.0, 0.5, 1.0], samples=2, methods=["window"], batch=6)
    assert res["accuracy"]["window"] == [[1.0, 0.0, 1.0]]


def test_main_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "needle.json", tmp_path / "needle.png"
    assert needle.main(["--lengths", "512,600", "--depths", "2", "--samples", "1",
                        "--methods", ",".join(needle.METHODS), "--dense-max-len", "512",
                        "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["lengths"] == [512, 600] and res["methods"] == list(needle.METHODS)
    assert "| 512 (1x) | 600 (1.17x) |" in printed
    rows = {r[0]: r[1:] for r in (
        [c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines()
        if line.startswith("|"))}
    assert rows["dense"] == ["100%", "-"] and res["accuracy"]["dense"][1] is None
    for m in needle.METHODS[1:]:
        assert len(rows[m]) == 2
        assert [len(a) for a in res["accuracy"][m]] == [2, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"heatmap: {png}" in printed
    # Before the table, what each method is; after it, what the numbers show.
    table_at = printed.index("\n|")
    for m in needle.METHODS:
        assert printed.index(f"{m}: {needle.METHOD_DESCRIPTIONS[m]}") < table_at
    assert needle.summary(res) in printed[table_at:]


@pytest.mark.parametrize("argv,flag", [
    (["--max-len", "10"], "--max-len"),
    (["--lengths", "64,10"], "--lengths"),
    (["--depths", "0"], "--depths"),
    (["--samples", "-1"], "--samples"),
    (["--batch", "0"], "--batch"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--dense-max-len", "-1"], "--dense-max-len"),
    (["--methods", "dense,foo"], "--methods"),
    (["--backend", "foo"], "--backend"),
    (["--device", "foo"], "--device"),
])
def test_main_refuses_bad_arguments_before_running(argv, flag, capsys, monkeypatch):
    # Bad values stop at argparse, naming the flag, before the model loads or a prompt runs.
    monkeypatch.setattr(needle.cli, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as e:
        needle.main(argv)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_default_lengths_below_the_trained_length():
    assert needle.default_lengths(100) == [100]
    assert needle.default_lengths(512) == [512]
    assert needle.default_lengths(5000) == [512, 2048, 5000]


def test_main_zero_dense_max_len_skips_dense(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert needle.main(["--lengths", "64", "--depths", "1", "--methods", "dense",
                        "--dense-max-len", "0", "--no-plot"]) == 0
    assert "|  dense |           - |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # --no-plot: no heatmap


def test_main_writes_the_heatmap_by_default(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert needle.main(["--lengths", "64", "--depths", "1", "--methods", "window"]) == 0
    assert f"heatmap: {needle.cli.DEFAULT_PLOT}" in capsys.readouterr().out
    assert (tmp_path / needle.cli.DEFAULT_PLOT).read_bytes()[:4] == b"\x89PNG"


def _res(acc, lengths=(512, 8192, 32768)):
    """A results dict as evaluate() returns it: acc maps a method to per-length accuracy
    (None: skipped), spread over two depths."""
    return {"trained_length": 512, "lengths": list(lengths), "depths": [0.25, 0.75],
            "samples": 1, "methods": list(acc),
            "accuracy": {m: [None if a is None else [a, a] for a in row]
                         for m, row in acc.items()}}


def test_summary_is_computed_from_the_results():
    res = _res({"dense": [1.0, 0.5, None], "window": [1.0, 0.0, 0.5],
                "reattention-bound": [1.0, 1.0, 0.75], "reattention-mean": [1.0, 0.5, 0.25]})
    assert needle.summary(res) == (
        "ReAttention with min/max chunk representatives found the needle in 75% of prompts at "
        "64x the trained length (32K tokens), while dense RoPE attention, run up to 16x the "
        "trained length (8K tokens), found 50% there; sink + local window with the same key "
        "budget found 50%.")
    res = _res({"dense": [0.0], "reattention-max": [1.0]}, lengths=[4096])
    assert needle.summary(res) == (
        "ReAttention with exact chunk scores (every raw key of a chunk) found the needle in 100% "
        "of prompts at 8x the trained length (4K tokens), where dense RoPE attention found 0%.")
    assert needle.summary(_res({"dense": [1.0, 1.0, 1.0]})) == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv", [["--backend", "cuda"], ["--device", "cuda"],
                                  ["--check", "--backend", "cuda"]])
def test_cli_refuses_cuda_without_a_gpu_in_one_line(argv):
    """No traceback: argparse's usage and one error line naming the flag, exit code 2, before
    the backend report or the model."""
    res = subprocess.run([sys.executable, "-m", "reattention", *argv], capture_output=True,
                         text=True)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {argv[-2]}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_main_without_transformers_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    want = r"needs transformers \(pip install 'reattention\[needle\]'\)"
    with pytest.raises(SystemExit, match=want):
        needle.main(["--lengths", "64", "--depths", "1"])
