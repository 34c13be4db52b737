"""The checks stage (deepchecks suites) on the tiny evaluated project: reports, summary, metrics and gates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageEnhance
from projects import REPO_ROOT, copy_project

from catdog.errors import QualityGateError
from catdog.stages import checks

pytestmark = pytest.mark.slow


@pytest.fixture
def project(served_project, tmp_path):
    return copy_project(served_project, tmp_path / "project")


def set_params(root, **values):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault("checks", {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_stage_writes_reports_summary_and_metrics(project):
    metrics = checks.run(project)
    reports = project / "reports" / "checks"
    suites = ("data_integrity", "train_test_validation", "model_evaluation")
    assert sorted(p.name for p in reports.glob("*.html")) == sorted(f"{s}.html" for s in suites)
    saved = json.loads((project / "metrics" / "checks.json").read_text())
    assert saved == metrics and saved["passed"] is True and saved["images"] == 32
    for suite in suites:
        counts = saved["suites"][suite]
        assert counts["gates_failed"] == 0 and counts["gates_passed"] >= 1
        assert set(counts) >= {"checks", "conditions_passed", "conditions_failed"}
    summary = json.loads((reports / "summary.json").read_text())
    assert [s["suite"] for s in summary["suites"]] == list(suites)
    by_check = {c["check"]: c for s in summary["suites"] for c in s["checks"]}
    for gated in ("DataDuplicates", "FeatureDrift", "LabelDrift", "TrainTestSamplesMix", "CalibrationScore"):
        assert by_check[gated]["gate"] is True, gated
    condition = by_check["CalibrationScore"]["conditions"][0]
    assert set(condition) == {"name", "category", "passed", "details", "gate"}
    assert not by_check["RocReport"]["gate"]  # deepchecks' default conditions are reported, never gates
    from mlflow import MlflowClient

    run = json.loads((project / "models" / "mlflow_run.json").read_text())
    logged = MlflowClient(run["tracking_uri"]).list_artifacts(run["run_id"], "checks/checks")
    assert {Path(a.path).name for a in logged} >= {"summary.json", "train_test_validation.html"}


def test_darker_test_images_fail_the_feature_drift_condition(project):
    set_params(project, min_samples=4)  # the tiny test split has 8 images
    for path in (project / "data" / "processed" / "test").rglob("*.jpg"):
        with Image.open(path) as img:
            ImageEnhance.Brightness(img).enhance(0.25).save(path, quality=95)
    with pytest.raises(QualityGateError, match=r"train_test_validation/FeatureDrift: .*brightness") as info:
        checks.run(project)
    assert "reports/checks" in str(info.value)
    saved = json.loads((project / "metrics" / "checks.json").read_text())
    assert saved["passed"] is False and saved["suites"]["train_test_validation"]["gates_failed"] >= 1


def test_images_duplicated_across_splits_fail_the_samples_mix_condition(project):
    processed = project / "data" / "processed"
    for label in ("cat", "dog"):
        train = sorted((processed / "train" / label).glob("*.jpg"))
        test = sorted((processed / "test" / label).glob("*.jpg"))
        for source, target in zip(train[:2], test[:2], strict=True):
            shutil.copyfile(source, target)
    with pytest.raises(QualityGateError, match=r"TrainTestSamplesMix"):
        checks.run(project)


def test_only_the_wrapper_imports_deepchecks():
    pattern = re.compile(r"^\s*(import|from)\s+deepchecks\b", re.MULTILINE)
    importers = [
        path.relative_to(REPO_ROOT).as_posix()
        for folder in ("src", "api", "tests", "flows", "benchmarks")
        if (REPO_ROOT / folder).is_dir()
        for path in (REPO_ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text(errors="ignore"))
    ]
    assert importers == ["src/catdog/checks.py"]
