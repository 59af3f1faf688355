"""Bad and hostile input to `launch plan` and `launch` (issue 18): every case ends with exit 2 and a message that
names the file (and line where there is one), never a traceback, a hang or a run directory. The cases an
adversarial pass found are spelled out; a property-based test mutates a valid recipe at the YAML and at the byte
level and holds every outcome to the same rule."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli.main import main

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = REPO / "recipes" / "models" / "llama-3.1-8b"


def base_recipe(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    (tmp_path / "train.jsonl").write_text('{"text": "a b"}\n')
    return {"name": "t", "model": {"path": str(LLAMA_8B)}, "data": {"train": [{"path": "train.jsonl", "format": "text"}]},
            "output": {"root": str(tmp_path / "runs")}, **sections}


def write(tmp_path: Path, content: str | bytes | dict[str, Any], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def launch_limited(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`launch ...` in a child with 2 GiB of address space and 60 s: a bomb fails the test instead of the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}  # this checkout
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env, preexec_fn=limit)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    return " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------------------------------ YAML itself
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


@pytest.mark.parametrize(("text", "expected"), [
    (BILLION_LAUGHS, "more than 100,000 values once its aliases"),
    ("model: &m {path: *m}\n", "nested more than 64 levels deep"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
])
def test_yaml_bombs_are_refused_quickly(tmp_path: Path, text: str, expected: str) -> None:
    proc = launch_limited("plan", str(write(tmp_path, text)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in " ".join(proc.stderr.split()) and "r.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_a_long_extends_chain_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(40):
        write(tmp_path, f"extends: p{i + 1}.yaml\n" if i < 39 else yaml.safe_dump(base_recipe(tmp_path)), f"p{i}.yaml")
    assert "more than 32 files extend one another" in refused(capsys, "plan", str(tmp_path / "p0.yaml"))


@pytest.mark.parametrize(("content", "expected"), [
    (b"name: t\nmodel: {path: caf\xe9}\n", "r.yaml:2): not UTF-8 text: byte 0xe9 at offset 25"),
    (b"name: t\x00\n", "holds a NUL byte"),
    (b"\xff\xfe" + "name: t\n".encode("utf-16-le"), "not UTF-8 text"),
])
def test_bytes_that_are_not_a_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                     expected: str) -> None:
    path = write(tmp_path, content)
    text = refused(capsys, "plan", str(path))
    assert expected in text and f"{path}" in text


def test_a_bad_parent_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, b"name: \xff\n", "parent.yaml")
    text = refused(capsys, "plan", str(write(tmp_path, "extends: parent.yaml\n")))
    assert "parent.yaml:1" in text and "not UTF-8" in text


@pytest.mark.parametrize(("section", "expected"), [
    ({"model": {"path": "a\0b"}}, "holds a NUL byte"),
    ({"model": {"path": "x" * 300}}, "longer than 255 bytes"),
    ({"output": {"root": "/tmp/" + "y" * 256}}, "longer than 255 bytes"),
    ({"data": {"train": [{"path": ""}]}}, "at least 1 character"),
])
def test_paths_no_file_system_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str], section: dict[str, Any],
                                    expected: str) -> None:
    assert expected in refused(capsys, "plan", str(write(tmp_path, {**base_recipe(tmp_path), **section})))


# ------------------------------------------------------------------------------------------- numbers and types
@pytest.mark.parametrize(("optim", "expected"), [
    ({"lr": float("inf")}, "finite number"),
    ({"epochs": float("inf")}, "finite number"),
    ({"lr": float("nan")}, "finite number"),
    ({"seed": 1e30}, "out of range"),
    ({"seed": -1}, "greater than or equal to 0"),
    ({"betas": [1, 2]}, "less than 1"),
    ({"max_steps": True}, "expected an integer, got true"),
    ({"grad_accum": 2**60}, "out of range"),
])
def test_numbers_are_what_they_say(tmp_path: Path, capsys: pytest.CaptureFixture[str], optim: dict[str, Any],
                                   expected: str) -> None:
    text = refused(capsys, "plan", str(write(tmp_path, base_recipe(tmp_path, optim=optim))))
    assert expected in text and "r.yaml" in text


@pytest.mark.parametrize("config", [
    {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0, "num_hidden_layers": 2, "vocab_size": 10},
    {"model_type": "llama", "hidden_size": [], "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 10},
    {"model_type": "llama", "hidden_size": 1e308, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 10},
    {"model_type": "llama", "hidden_size": "64", "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 10},
    [],
    {"model_type": "llama"},
])
def test_a_hostile_config_json_is_a_problem_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            config: Any) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    text = refused(capsys, "plan", str(write(tmp_path, base_recipe(tmp_path, model={"path": str(model)}))))
    assert "model.path" in text and "cannot size the model" in text and "config.json" in text


@pytest.mark.parametrize("size", ["1e400GiB", "nanGiB", "0GiB", "-5GiB", "80XB"])
def test_gpu_mem_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str) -> None:
    text = refused(capsys, "plan", str(write(tmp_path, base_recipe(tmp_path))), f"--gpu-mem={size}")
    assert "--gpu-mem: cannot read a memory size" in text


def test_thousands_of_unknown_keys_are_listed_up_to_a_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = base_recipe(tmp_path)
    recipe["optim"] = {f"k{i}": i for i in range(20_000)}
    text = refused(capsys, "plan", str(write(tmp_path, recipe)))
    assert "20000 problems" in text and "... and 19950 more" in text


def test_missing_data_is_a_warning_for_plan_and_an_error_for_launch(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = base_recipe(tmp_path)
    recipe["data"]["train"][0]["path"] = "trian.jsonl"
    path = write(tmp_path, recipe)
    assert main(["plan", str(path), "--json"]) == 0
    assert "trian.jsonl does not exist" in " ".join(json.loads(capsys.readouterr().out)["warnings"])
    text = refused(capsys, str(path))
    assert "data.train.0.path" in text and "trian.jsonl does not exist" in text and "r.yaml:" in text
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ property-based
HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "\0", "x" * 300, "../../x", "a\nb", "$(id)", "1e400", "auto", "*", "&a"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
KEY_PATHS = st.sampled_from([
    ("name",), ("model",), ("model", "path"), ("model", "dtype"), ("data",), ("data", "train"), ("data", "max_length"),
    ("method",), ("method", "name"), ("method", "r"), ("optim", "lr"), ("optim", "micro_batch"), ("optim", "betas"),
    ("optim", "max_steps"), ("optim", "seed"), ("strategy", "name"), ("strategy", "deepspeed", "offload_params"),
    ("cluster", "account"), ("cluster", "env"), ("cluster", "sbatch_options"), ("kernels",), ("output", "name"),
    ("eval", "every_steps"), ("extends",), ("unknown", "key"),
])


@settings(max_examples=120, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(KEY_PATHS, HOSTILE_VALUES), min_size=1, max_size=4),
       noise=st.one_of(st.none(), st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8))))
def test_any_mutation_is_planned_or_refused_with_the_file_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                mutations: list[tuple[tuple[str, ...], Any]],
                                                                noise: tuple[int, bytes] | None) -> None:
    recipe = base_recipe(tmp_path)
    for keys, value in mutations:
        node = recipe
        for key in keys[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[keys[-1]] = value
    content = yaml.safe_dump(recipe, allow_unicode=True).encode()
    if noise is not None:  # bytes spliced into the file: broken YAML, binary, invalid UTF-8
        at, junk = noise
        content = content[:at] + junk + content[at:]
    path = write(tmp_path, content)
    code = main(["plan", str(path), "--json"])  # an exception escaping here fails the test (a traceback)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert str(path) in err or "override" in err, err
    assert not (tmp_path / "runs").exists()  # `launch plan` writes nothing
