"""Bad inputs a new user hits first (issue 25, item 8): each is refused in one line that names the file or
option and what was expected, before any weights load (`from_pretrained` and the converter's tensor pass
are made to fail here, so a refusal that came late would show as that failure instead)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import cli
from tests.helpers import save_static
from zeda_rl import convert


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny static Qwen3-MoE (N=8, K=2) without tokenizer files, and its converted copy (also without)."""
    root = tmp_path_factory.mktemp("inputs")
    save_static("qwen3_moe", root / "static")
    convert.convert_checkpoint(root / "static", root / "converted", zero_experts=4)
    return root


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or a tokenizer, or reading a checkpoint's tensors to convert it, fails the test."""

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the input was refused")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(convert, "_plan", boom)


def refused(capsys, *argv) -> str:
    """`zeda ARGV` in this process: exit 2 and one error line, which is returned."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"zeda {argv[0]}: error: "), (code, err)
    return err[0]


def with_tokenizer(src: Path, dst: Path, config_bytes: bytes | None = None, **changes) -> Path:
    """A copy of `src` with a tokenizer_config.json, and its config.json replaced or edited."""
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    cfg = dst / "config.json"
    if config_bytes is None:
        config_bytes = json.dumps({**json.loads(cfg.read_text()), **changes}).encode()
    cfg.write_bytes(config_bytes)
    return dst


# ---- zeda eval: no tokenizer files ------------------------------------------------------------


@pytest.mark.parametrize("which", ["static", "converted"])
def test_eval_without_tokenizer_files_names_the_directory(ckpts, no_loading, capsys, which):
    d = ckpts / which
    line = refused(capsys, "eval", d, "--n", 1)
    assert f"{d}: no tokenizer files" in line and "tokenizer.json" in line and "tokenizer_config.json" in line, line


def test_eval_without_tokenizer_files_on_the_teacher_side_is_refused_up_front(ckpts, no_loading, capsys, tmp_path):
    good = with_tokenizer(ckpts / "converted", tmp_path / "good")
    line = refused(capsys, "eval", good, "--teacher", ckpts / "static", "--n", 1)
    assert f"{ckpts / 'static'}: no tokenizer files" in line, line


# ---- zeda eval --n ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-5"])
def test_eval_n_below_one_is_refused_at_parsing(capsys, n):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["eval", "ckpt", "--n", n])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --n: expected an integer >= 1" in err and f"got {n}" in err, err


def test_evaluate_refuses_n_below_one_before_loading(ckpts, no_loading):
    from zeda_rl.evaluate import evaluate

    with pytest.raises(ValueError, match=r"n_per_family .*>= 1.*got 0"):
        evaluate(ckpts / "converted", n_per_family=0)


# ---- config.json: not JSON, not an object, experts per token out of range ---------------------

BAD_CONFIGS = {
    "not JSON": ({"config_bytes": b'{"architectures": ["Qwen3MoeForCausalLM"],'}, ["not valid JSON"]),
    "a list": ({"config_bytes": b'["Qwen3MoeForCausalLM"]'}, ["expected a JSON object", "got a JSON array"]),
    "not UTF-8": ({"config_bytes": b'{"a": "\xff\xfe"}'}, ["not valid JSON"]),
    "K > N": ({"num_experts_per_tok": 9}, ["num_experts_per_tok=9", "num_local_experts=8", "expected 1 <="]),
    "K = 0": ({"num_experts_per_tok": 0}, ["num_experts_per_tok=0", "num_local_experts=8", "expected 1 <="]),
    "K < 0": ({"num_experts_per_tok": -2}, ["num_experts_per_tok=-2", "expected 1 <="]),
    "K not int": ({"num_experts_per_tok": "2"}, ["num_experts_per_tok='2'", "expected 1 <="]),
    "N not int": ({"num_local_experts": 8.5}, ["num_local_experts=8.5", "expected a whole number"]),
}


def _bad(ckpts, tmp_path, case) -> Path:
    return with_tokenizer(ckpts / "static", tmp_path / "bad", **BAD_CONFIGS[case][0])


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("cmd", ["eval", "convert"])
def test_bad_config_json_is_refused_naming_the_file(ckpts, no_loading, capsys, tmp_path, case, cmd):
    d = _bad(ckpts, tmp_path, case)
    argv = ["eval", d, "--n", 1] if cmd == "eval" else ["convert", d, tmp_path / "out", "--zero-experts", 4]
    line = refused(capsys, *argv)
    assert f"{d / 'config.json'}: " in line, line
    for word in BAD_CONFIGS[case][1]:
        assert word in line, (word, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["a list", "K > N"])
def test_suite_eval_reads_the_same_checked_config(ckpts, tmp_path, case):
    from zeda_rl.checks import check_routers
    from zeda_rl.evaluate import moe_shape

    d = _bad(ckpts, tmp_path, case)
    for call in (moe_shape, check_routers):  # the suites' shape reader; the learner's and engines' router check
        with pytest.raises(ValueError) as info:
            call(d)
        assert f"{d / 'config.json'}: " in str(info.value) and BAD_CONFIGS[case][1][0] in str(info.value)


def test_converted_checkpoint_k_is_checked_against_real_experts(ckpts, no_loading, capsys, tmp_path):
    d = with_tokenizer(ckpts / "converted", tmp_path / "bad", num_experts_per_tok=10)  # 10 <= N + N_Z, but > N
    line = refused(capsys, "eval", d, "--n", 1)
    assert f"{d / 'config.json'}: num_experts_per_tok=10" in line and "num_experts=8" in line, line


# ---- zeda convert --zero-experts --------------------------------------------------------------


@pytest.mark.parametrize("nz", [100_000_000, 33])
def test_convert_refuses_too_many_zero_experts_before_reading_tensors(ckpts, no_loading, capsys, tmp_path, nz):
    line = refused(capsys, "convert", ckpts / "static", tmp_path / "out", "--zero-experts", nz)
    assert f"--zero-experts {nz}:" in line and "expected 1 to 32" in line and "8 real experts" in line, line
    assert str(ckpts / "static" / "config.json") in line and "N/2 = 4" in line, line
    assert list(tmp_path.iterdir()) == []


def test_convert_allows_up_to_the_bound(ckpts, tmp_path):
    out = convert.convert_checkpoint(ckpts / "static", tmp_path / "out", zero_experts=32)
    assert json.loads((out / "config.json").read_text())["zce_nums"] == [32]


@pytest.mark.parametrize("nz", ["0", "-3"])
def test_convert_zero_experts_below_one_is_refused_at_parsing(capsys, nz):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["convert", "in", "out", "--zero-experts", nz])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --zero-experts: expected an integer >= 1" in err and f"got {nz}" in err
