"""One list of stop ids for every phase and engine (`zeda_rl.chat.stop_ids`), and SFT answers that end
where the template ends the assistant turn, on the published GLM-4.7-Flash and Qwen3 chat templates.

GLM-4.x ends an assistant turn with no eos token: generation stops on the next role marker, which
its generation_config.json lists as eos ids ([<|endoftext|>, <|user|>, <|observation|>]). Qwen3 ends
the turn with <|im_end|> (its tokenizer's eos) and also lists <|endoftext|>. The fixtures
(tests/fixtures/tokenizers, README there) carry the published templates and ids with a tiny vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from launch import streams
from launch.config import load_config
from launch.rollouts import sampling_params, with_teacher_stops
from zeda_rl.chat import ChatFormat, TemplateError, stop_ids
from zeda_rl.data import Record, to_record
from zeda_rl.sampling import SamplingParams
from zeda_rl.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKS = ROOT / "tests" / "fixtures" / "tokenizers"
DATA = ROOT / "tests" / "fixtures" / "data"
GLM, QWEN = TOKS / "glm-4.7-flash", TOKS / "qwen3"
CONFIGS = {GLM: "launch/configs/glm-4.7-flash-h200.yaml", QWEN: "launch/configs/qwen3-30b-a3b-h200.yaml"}
PUBLISHED = {  # sha256 of the published chat_template.jinja (README.md there says where each came from)
    GLM: "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375",
    QWEN: "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
}
END_OF_TURN = {GLM: "<|user|>", QWEN: "<|im_end|>"}
BOTH = pytest.mark.parametrize("ckpt", [GLM, QWEN], ids=lambda p: p.name)


def _eos(path: Path) -> set[int]:
    eos = json.loads(path.read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos])


def _generation_eos(ckpt: Path) -> set[int]:
    return _eos(ckpt / "generation_config.json")


def _record(ckpt: Path, thinking: bool = True) -> Record:
    # what `zeda rollouts` records: the decoded output after the generation prompt, its stop token dropped
    # (GLM's prompt already opens the thinking block; Qwen3's model writes it)
    answer = {
        GLM: "The user asks for a sum.</think>The answer is 4.",
        QWEN: "<think>\nThe user asks for a sum.\n</think>\n\nThe answer is 4.",
    }[ckpt]
    return to_record(
        {"prompt": "What is 2 + 2?", "response": answer if thinking else "The answer is 4."}, "answers.jsonl:7", "a:7"
    )


@BOTH
def test_fixtures_carry_the_published_templates(ckpt):
    text = (ckpt / "chat_template.jinja").read_bytes()
    assert hashlib.sha256(text).hexdigest() == PUBLISHED[ckpt]
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == text.decode()


@BOTH
def test_stop_ids_are_generation_config_config_and_tokenizer_eos(ckpt):
    tok = AutoTokenizer.from_pretrained(ckpt)
    want = _generation_eos(ckpt) | _eos(ckpt / "config.json") | {tok.eos_token_id}
    assert stop_ids(ckpt) == stop_ids(tok) == stop_ids(ckpt, tok) == tuple(sorted(want))
    assert _generation_eos(ckpt) <= set(stop_ids(ckpt)) and ChatFormat(tok).stop_ids == stop_ids(ckpt)
    if ckpt == QWEN:  # <|endoftext|> is named by generation_config.json only
        assert stop_ids(ckpt) == (151643, 151645) and tok.eos_token_id == 151645
    else:  # the tokenizer's eos is <|endoftext|> alone; <|user|> and <|observation|> come from the configs
        assert stop_ids(ckpt) == (154820, 154827, 154829) and tok.eos_token_id == 154820


def test_generation_config_alone_gives_glm_its_turn_markers(tmp_path):
    ckpt = shutil.copytree(GLM, tmp_path / "glm")
    (ckpt / "config.json").unlink()
    assert stop_ids(ckpt) == (154820, 154827, 154829)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 154827}))  # an int, not a list
    assert stop_ids(ckpt) == (154820, 154827)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|user|>"}))
    with pytest.raises(TemplateError, match=r"generation_config\.json: eos_token_id is '<\|user\|>'"):
        stop_ids(ckpt)


@BOTH
@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_sft_answer_ends_with_the_token_that_ends_the_turn(ckpt, thinking):
    tok = AutoTokenizer.from_pretrained(ckpt)
    fmt = ChatFormat(tok, enable_thinking=thinking)
    rec = _record(ckpt, thinking)
    p, a = fmt.sft_ids(rec)
    assert p == fmt.prompt_ids(rec)  # trained on the very prompt the engines are given
    end = tok.convert_tokens_to_ids(END_OF_TURN[ckpt])
    assert a[-1] == end and end in _generation_eos(ckpt) and end in fmt.stop_ids
    full = tok.apply_chat_template(
        [*rec.messages, {"role": "assistant", "content": rec.response}], tokenize=False, enable_thinking=thinking
    )
    if ckpt == GLM:  # no end-of-turn token in the turn: the answer ends with the next turn's marker
        assert not any(t in full.split("<|assistant|>")[-1] for t in fmt.stop_tokens().values())
        assert tok.decode(p + a) == full + "<|user|>"
    else:  # the turn's own <|im_end|>, its newline not trained on (as before)
        assert tok.decode(p + a) == full.rstrip("\n") and full.endswith("<|im_end|>\n")
    assert "The answer is 4." in tok.decode(a)


def test_a_glm_template_whose_turn_marker_is_no_stop_id_is_refused_naming_what_it_rendered(tmp_path):
    ckpt = shutil.copytree(GLM, tmp_path / "glm")
    for name in ("generation_config.json", "config.json"):  # as if only the tokenizer's eos were known
        (ckpt / name).write_text(json.dumps({"eos_token_id": 154820}))
    fmt = ChatFormat(AutoTokenizer.from_pretrained(ckpt))
    assert fmt.stop_ids == (154820,)
    with pytest.raises(TemplateError) as err:
        fmt.sft_ids(_record(GLM))
    msg = str(err.value)
    assert msg.startswith("answers.jsonl:7: the chat template of") and "does not end the assistant turn" in msg
    assert "{154820: '<|endoftext|>'}" in msg  # the stop ids
    assert "The answer is 4.'" in msg and "right after it, before a next user turn, is '<|user|>'" in msg  # rendered
    assert "first token 154827 '<|user|>' is not a stop id" in msg


@BOTH
def test_sft_records_of_a_run_end_their_turns(ckpt):
    """A whole H200 config's SFT data (streams.build, as the pipeline builds it) from released rollouts."""
    tok = AutoTokenizer.from_pretrained(ckpt)
    overrides = {
        "data.sft_rollouts": str(DATA / "rollouts"),
        "data.opd_prompts": str(DATA / "chat_prompts.jsonl"),
        "data.fields.id": "uuid",
    }
    data = streams.build(load_config(CONFIGS[ckpt], overrides), tok)
    b, end = data.sft_records, tok.convert_tokens_to_ids(END_OF_TURN[ckpt])
    lengths = b["attention_mask"].sum(1)
    assert len(lengths) == 12 and all(b["tokens"][i, lengths[i] - 1] == end for i in range(12))
    assert all(b["loss_mask"][i, lengths[i] - 1] == 1 for i in range(12))


@BOTH
def test_rollouts_and_opd_stop_on_every_generation_config_eos_id(ckpt):
    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = str(DATA / "prompts.jsonl")
    cfg = load_config(CONFIGS[ckpt], {"data.sft_prompts": prompts, "data.opd_prompts": prompts})
    data = streams.build(cfg, tok)
    want = _generation_eos(ckpt)
    # the teacher's SFT rollouts (`zeda rollouts`: sampling_params(cfg, fmt.stop_ids))
    assert want <= set(sampling_params(cfg, data.format.stop_ids).stop_token_ids)
    # the SFT phase still passes the tokenizer's eos alone: write_rollouts adds the teacher's stop ids
    assert want <= set(with_teacher_stops(sampling_params(cfg, data.format.eos_id), ckpt).stop_token_ids)
    # OPD samples with cfg.sampling stopping on data.format.stop_ids (launch/opd.py)
    opd = cfg.sampling.model_copy(update={"stop_token_ids": data.format.stop_ids})
    assert want <= set(opd.stop_token_ids) and data.format.stop_ids == stop_ids(ckpt)


def test_the_torch_engine_stops_on_any_stop_id_not_just_the_first(tmp_path):
    """GLM's answer ends on <|user|>, the second of three ids: the engine must stop on whichever comes."""
    from actors.engine import make_engine
    from tests.helpers import save_static

    save_static("glm4_moe_lite", tmp_path / "m", eos_token_id=1, pad_token_id=0)
    eng = make_engine("torch", str(tmp_path / "m"))
    prompt = [[5, 6, 7, 8]]
    free = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6))[0].output_ids
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    never = next(t for t in range(2, 64) if t not in free)
    s = eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=(never, free[k])))[0]
    assert s.output_ids == free[: k + 1] and s.finish_reason == "stop"


def test_the_embedded_tokenizer_is_unchanged():
    tok = build_tokenizer()
    fmt = ChatFormat(tok)
    assert not fmt.templated and fmt.stop_ids == (tok.eos_token_id,) == (1,)
    p, a = fmt.sft_ids(to_record({"prompt": "12+30=", "response": "42"}, "x:1", "x:1"))
    assert p == tok("12+30=").input_ids and a == tok("42", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_the_embedded_teacher_checkpoint_stops_on_its_eos_alone(tmp_path):
    """A checkpoint saved like the embedded teacher (config and generation_config name eos 1): (1,), as before."""
    from tests.helpers import save_static

    save_static("qwen3_moe", tmp_path / "t", eos_token_id=1, pad_token_id=0)
    build_tokenizer().save_pretrained(tmp_path / "t")
    assert stop_ids(tmp_path / "t") == (1,)
    assert ChatFormat(AutoTokenizer.from_pretrained(tmp_path / "t")).stop_ids == (1,)


def test_doctor_prints_the_stop_ids_and_what_sft_answers_end_with(tmp_path):
    from launch.doctor import FAIL, OK, stops_check

    glm = stops_check(load_config(CONFIGS[GLM], {"model.teacher": str(GLM)}))
    assert glm.name == "stop ids" and glm.status == OK, glm
    assert "stop on 154820 '<|endoftext|>', 154827 '<|user|>', 154829 '<|observation|>'" in glm.detail
    assert "SFT answers end with 154827 '<|user|>'" in glm.detail
    qwen = stops_check(load_config(CONFIGS[QWEN], {"model.teacher": str(QWEN)}))
    assert qwen.status == OK and "SFT answers end with 151645 '<|im_end|>'" in qwen.detail, qwen
    embedded = stops_check(load_config(ROOT / "launch" / "configs" / "tiny-cpu.yaml"))
    assert embedded.status == OK and "embedded teacher" in embedded.detail and "stop on 1 '<eos>'" in embedded.detail
    broken = shutil.copytree(GLM, tmp_path / "glm")
    for name in ("generation_config.json", "config.json"):
        (broken / name).write_text(json.dumps({"eos_token_id": 154820}))
    bad = stops_check(load_config(CONFIGS[GLM], {"model.teacher": str(broken)}))
    assert bad.status == FAIL and "SFT answers cannot end" in bad.detail and "'<|user|>'" in bad.detail
