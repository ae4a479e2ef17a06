"""Reading cosyvoice2.yaml: official files load as data, hostile ones are refused, none run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tts_core.cosyvoice2 import hyperyaml
from tts_core.cosyvoice2.hyperyaml import HyperYamlError, Tagged

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY_DIR = Path(os.environ.get("COSYVOICE2_PARITY_DIR", SHARED / "parity" / "cosyvoice2"))
OFFICIAL_YAML = PARITY_DIR / "cosyvoice2.yaml"


@pytest.fixture(scope="module")
def official() -> dict:
    if not OFFICIAL_YAML.is_file():
        pytest.skip(f"parity directory not found at {PARITY_DIR}")
    return hyperyaml.load(OFFICIAL_YAML)


def test_official_file_top_level_values(official: dict) -> None:
    assert official["sample_rate"] == 24000
    assert official["token_frame_rate"] == 25
    assert official["token_mel_ratio"] == 2
    assert official["chunk_size"] == 25
    assert official["num_decoding_left_chunks"] == -1
    # "1e-05" has no dot: YAML 1.1 would read a string, the official file means a float.
    assert official["train_conf"]["optim_conf"]["lr"] == pytest.approx(1e-5)


def test_official_file_modules_are_inert_records(official: dict) -> None:
    llm = official["llm"]
    assert isinstance(llm, Tagged)
    assert (llm.kind, llm.target) == ("new", "cosyvoice.llm.llm.Qwen2LM")
    assert llm.args["llm_input_size"] == official["llm_input_size"]  # !ref resolved
    assert llm.args["mix_ratio"] == [5, 15]
    sampling = llm.args["sampling"]
    assert (sampling.kind, sampling.target) == ("name", "cosyvoice.utils.common.ras_sampling")
    assert sampling.args == {"top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}

    flow = official["flow"]
    assert flow.args["spk_embed_dim"] == 192
    assert flow.args["encoder"].args["static_chunk_size"] == official["chunk_size"]
    cfm = flow.args["decoder"].args["cfm_params"]
    assert cfm.kind == "new" and cfm.args["content"]["sigma_min"] == pytest.approx(1e-6)
    assert cfm.args["content"]["inference_cfg_rate"] == pytest.approx(0.7)


def test_official_file_arithmetic_ref(official: dict) -> None:
    estimator = official["flow"].args["decoder"].args["estimator"].args
    # !ref <chunk_size> * <token_mel_ratio>
    assert estimator["static_chunk_size"] == official["chunk_size"] * official["token_mel_ratio"]
    assert estimator["num_decoding_left_chunks"] == -1


def test_official_file_refs_to_modules_and_lists(official: dict) -> None:
    # `generator: !ref <hift>` shares the resolved record, tags and all.
    assert official["hifigan"].args["generator"] == official["hift"]
    assert official["hift"].args["sampling_rate"] == official["sample_rate"]
    assert official["hift"].args["istft_params"] == {"n_fft": 16, "hop_len": 4}
    pipeline = official["data_pipeline"]
    assert [node.target.rsplit(".", 1)[-1] for node in pipeline[:3]] == [
        "parquet_opener", "tokenize", "filter"]
    assert pipeline[1].args["get_tokenizer"].target.endswith("get_qwen_tokenizer")


def test_official_apply_lines_are_not_called(official: dict) -> None:
    seed = official["__set_seed3"]
    assert seed == Tagged("apply", "torch.manual_seed", [1986])


def test_apply_of_os_system_stays_inert(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = (
        f"run: !apply:os.system ['touch {marker}']\n"
        f"new: !new:subprocess.Popen\n    args: ['touch', '{marker}']\n"
        f"name: !name:builtins.exec ['open(\"{marker}\", \"w\")']\n"
    )
    data = hyperyaml.loads(text)
    assert data["run"] == Tagged("apply", "os.system", [f"touch {marker}"])
    assert data["new"].kind == "new" and data["new"].target == "subprocess.Popen"
    assert data["name"].target == "builtins.exec"
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['echo hi']\n",
    "a: !!python/name:os.system\n",
    "a: !!python/object:collections.OrderedDict {}\n",
    "a: !!python/tuple [1, 2]\n",
])
def test_python_tags_are_rejected(text: str) -> None:
    with pytest.raises(HyperYamlError, match="not valid YAML"):
        hyperyaml.loads(text)


@pytest.mark.parametrize("text, tag", [
    ("a: !foo 3\n", "!foo"),
    ("a: !foo:bar.baz 3\n", "!foo:bar.baz"),
    ("a: !new 3\n", "!new"),  # no target
    ("a: !refx <b>\n", "!refx"),
    ("a: !include other.yaml\n", "!include"),
])
def test_unknown_tags_are_rejected_with_line(text: str, tag: str) -> None:
    with pytest.raises(HyperYamlError, match=f"unsupported tag {tag} at line 1"):
        hyperyaml.loads(text)


@pytest.mark.parametrize("expression", [
    "<b>()",
    "__import__('os').system('echo hi')",
    "<b>.real",
    "<b>.__class__",
    "<b> ** 100000000",
    "[x for x in range(9)]",
    "<b> if 1 else 2",
    "'text'",
    "lambda: 1",
])
def test_ref_expressions_beyond_arithmetic_are_rejected(expression: str) -> None:
    with pytest.raises(HyperYamlError, match="only numbers, references"):
        hyperyaml.loads(f'b: 2\na: !ref "{expression}"\n')


def test_ref_arithmetic_forms() -> None:
    data = hyperyaml.loads(
        "b: 4\nc:\n  d: 3\n"
        "sum: !ref <b> + <c.d>\n"
        "neg: !ref -<b> * 2\n"
        "div: !ref <b> / 8\n"
        "floordiv: !ref (<b> + 3) // 2\n"
        "nested: !ref <sum> - 1\n"
    )
    assert data["sum"] == 7
    assert data["neg"] == -8
    assert data["div"] == pytest.approx(0.5)
    assert data["floordiv"] == 3
    assert data["nested"] == 6


@pytest.mark.parametrize("text, message", [
    ("a: !ref <b>\nb: !ref <a>\n", "circular !ref"),
    ("a: !ref <a>\n", "circular !ref <a>"),
    ("a: !ref <b> + 1\nb: !ref <c>\nc: !ref <a>\n", "circular !ref"),
    ("a: !ref <zz>\n", "!ref <zz> names no key"),
    ("x:\n  y: 1\na: !ref <x.z>\n", "!ref <x.z> names no key"),
    ("x: [1, 2]\na: !ref <x.0>\n", "names no key"),
    ("b: 'text'\na: !ref <b> * 3\n", "arithmetic on a non-number"),
    ("b: true\na: !ref <b> + 1\n", "arithmetic on a non-number"),
    ("b: 0\na: !ref 1 / <b>\n", "division by zero"),
    ("a: !ref\n", "cannot read !ref"),
])
def test_bad_refs_are_rejected(text: str, message: str) -> None:
    with pytest.raises(HyperYamlError, match=message):
        hyperyaml.loads(text)


def test_not_a_mapping_and_broken_yaml() -> None:
    with pytest.raises(HyperYamlError, match="top level"):
        hyperyaml.loads("- 1\n- 2\n")
    with pytest.raises(HyperYamlError, match="not valid YAML"):
        hyperyaml.loads("a: [1, 2\n")


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 9):
        prev = f"*l{level - 1}"
        lines.append(f"l{level}: &l{level} [{', '.join([prev] * 10)}]")
    with pytest.raises(HyperYamlError, match="expands to more than"):
        hyperyaml.loads("\n".join(lines) + "\n")
