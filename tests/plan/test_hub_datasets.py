"""Data sources on the planning side: `hub:` datasets (launcher/common/hub_data.py) found in a fake Hub cache, refused
at plan time when neither cached nor downloadable, downloaded by `launch` only; the tokenization cache key follows the
snapshot's commit; `data.prompt_style` is checked against the formats. No network, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import LocalExecutor
from launcher.cli.main import main
from launcher.common import hub_data
from launcher.config.recipe import RecipeError, load_recipe
from launcher.plan.resources import Resources
from tiny import sample_rows, use_hub_cache, write_hub_dataset

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_hub_cache(monkeypatch, tmp_path / "hub")


def recipe(tmp_path: Path, data: dict[str, Any], name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "t", "model": {"path": "m"}, "data": data,
                                    "output": {"root": str(tmp_path / "runs")}}, sort_keys=False))
    return path


HUB = {"train": [{"hub": "org/alpaca", "split": "train", "format": "alpaca"}]}


def test_a_source_names_exactly_one_of_path_and_hub(tmp_path: Path) -> None:
    for source in ({"path": "t.jsonl", "hub": "org/alpaca"}, {"format": "alpaca"}):
        with pytest.raises(RecipeError) as err:
            load_recipe(recipe(tmp_path, {"train": [source]}))
        text = str(err.value)
        assert "data.train.0" in text and "r.yaml:" in text and "exactly one of path" in text and "hub" in text
    with pytest.raises(RecipeError, match="subset applies to hub sources only"):
        load_recipe(recipe(tmp_path, {"train": [{"path": "t.jsonl", "subset": "x"}]}))
    with pytest.raises(RecipeError, match="data.train.0.revision"):
        load_recipe(recipe(tmp_path, {"train": [{"hub": "org/alpaca", "revision": "../../etc"}]}))


def test_a_cached_hub_dataset_plans_and_a_missing_split_is_named(tmp_path: Path, hub_cache: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    write_hub_dataset(hub_cache, "org/alpaca", {"data/train.jsonl": sample_rows("alpaca", 4)}, COMMIT_A)
    assert main(["plan", str(recipe(tmp_path, HUB)), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"]["data"]["train"][0]["hub"] == "org/alpaca"
    assert not any("data.train" in w for w in plan["warnings"]), plan["warnings"]

    bad = recipe(tmp_path, {"train": [{"hub": "org/alpaca", "split": "validation", "format": "alpaca"}]})
    assert main(["plan", str(bad), "--json"]) == 0  # sizing needs no data: a warning ...
    assert any(w.startswith("data.train.0.split:") and "no split 'validation' (splits: train)" in w
               for w in json.loads(capsys.readouterr().out)["warnings"])
    with pytest.raises(RecipeError, match=r"data\.train\.0\.split.*no split 'validation'"):
        LocalExecutor(Resources()).prepare(load_recipe(bad))  # ... and no run starts with it


def test_a_dataset_neither_cached_nor_reachable_fails_at_plan_time(tmp_path: Path, hub_cache: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = recipe(tmp_path, HUB)
    assert main(["plan", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.train.0.hub" in err and "r.yaml:" in err  # the key and its line
    assert f"{hub_cache / 'datasets--org--alpaca'}" in err and "HF_HUB_OFFLINE is set" in err  # where it looked, why
    assert "hf download --repo-type dataset org/alpaca" in err and "save_to_disk" in err  # how to fix it


def test_launch_downloads_a_missing_dataset_and_plan_does_not(tmp_path: Path, hub_cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    downloads: list[tuple[str, str | None]] = []

    def download(repo: str, revision: str | None) -> Path:
        downloads.append((repo, revision))
        return write_hub_dataset(hub_cache, repo, {"train.jsonl": sample_rows("alpaca", 3)}, COMMIT_A)

    monkeypatch.setattr(hub_data, "probe", lambda repo, revision: None)  # the Hub answers: it exists
    monkeypatch.setattr(hub_data, "download", download)
    loaded = load_recipe(recipe(tmp_path, {"train": [{"hub": "org/alpaca", "format": "alpaca", "revision": "v1"}]}))
    assert main(["plan", str(loaded.source)]) == 0 and downloads == []
    run = LocalExecutor(Resources()).prepare(loaded)
    assert downloads == [("org/alpaca", "v1")] and (run.run_dir / "plan.json").is_file()


def test_the_cache_key_follows_the_snapshot_commit(tmp_path: Path, hub_cache: Path) -> None:
    from launcher.train.data import data_fingerprint  # standard library and huggingface_hub only

    cfg = load_recipe(recipe(tmp_path, HUB)).recipe.data
    missing = data_fingerprint(cfg)
    write_hub_dataset(hub_cache, "org/alpaca", {"train.jsonl": sample_rows("alpaca", 2)}, COMMIT_A)
    first = data_fingerprint(cfg)
    write_hub_dataset(hub_cache, "org/alpaca", {"train.jsonl": sample_rows("alpaca", 2)}, COMMIT_B)  # refs/main moves
    second = data_fingerprint(cfg)
    assert len({missing, first, second}) == 3
    pinned = cfg.model_copy(update={"train": [cfg.train[0].model_copy(update={"revision": COMMIT_A})]})
    assert data_fingerprint(pinned) not in (first, second)  # the revision asked for is part of the key too
    styled = cfg.model_copy(update={"prompt_style": "alpaca"})
    assert data_fingerprint(styled) != second


def test_prompt_style_alpaca_needs_alpaca_rows(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(json.dumps(sample_rows("messages", 1)[0]) + "\n")
    with pytest.raises(RecipeError) as err:
        LocalExecutor(Resources()).plan(load_recipe(recipe(tmp_path, {"train": {"path": "t.jsonl"},
                                                                      "prompt_style": "alpaca"})))
    assert "data.prompt_style" in str(err.value) and "no data source has that format" in str(err.value)



def test_one_override_switches_a_source_between_path_and_hub(tmp_path: Path) -> None:
    local = recipe(tmp_path, {"train": [{"path": "t.jsonl", "format": "alpaca"}]})
    switched = load_recipe(local, ["data.train.0.hub=org/alpaca"]).recipe.data.train[0]
    assert (switched.path, switched.hub, switched.format) == (None, "org/alpaca", "alpaca")
    hub = recipe(tmp_path, {"train": [{"hub": "org/alpaca", "subset": "x", "revision": "v1"}]}, "hub.yaml")
    back = load_recipe(hub, ["data.train.0.path=t.jsonl"]).recipe.data.train[0]
    assert (back.path, back.hub, back.subset, back.revision) == (str(Path.cwd() / "t.jsonl"), None, None, None)


def test_launch_baseline_downloads_a_missing_hub_dataset_as_launch_does(tmp_path: Path, hub_cache: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = {**HUB, "eval_fraction": 0.25}
    assert main(["baseline", str(recipe(tmp_path, data)), "--json"]) == 2  # not cached, HF_HUB_OFFLINE: named
    err = " ".join(capsys.readouterr().err.split())
    assert "data.train.0.hub" in err and "hf download --repo-type dataset org/alpaca" in err

    downloads: list[str] = []

    def download(repo: str, revision: str | None) -> Path:
        downloads.append(repo)
        return write_hub_dataset(hub_cache, repo, {"data/train.jsonl": sample_rows("alpaca", 8)}, COMMIT_A)

    monkeypatch.setattr(hub_data, "download", download)  # the Hub, which this machine cannot reach
    out = tmp_path / "with-baseline"
    assert main(["baseline", str(recipe(tmp_path, data)), "--out", str(out)]) == 0 and downloads == ["org/alpaca"]
    # Read from the file: stdout may also hold log lines when an earlier in-process run left its log handlers.
    report = json.loads((out / "baseline.json").read_text())
    assert report["baselines"], report  # the copy-the-input baseline, scored on 2 held-out rows of the download
