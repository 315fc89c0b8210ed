"""converter/report.py: the typed report every reader of OUT/report.json goes through."""

import json

import pytest

from nvfp4.converter.report import Report
from nvfp4.errors import UserError

REPORT = {
    "source": None,
    "source_dir": "/m",
    "model": "LlamaForCausalLM",
    "scheme": "nvfp4",
    "quant_config": {"scale_search": "amax"},
    "nvfp4_parameter_share": 0.8,
    "high_precision_modules": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
    "targets": ["trtllm"],
    "calibration": None,
    "seed": 0,
    "sizes_bytes": {"bf16": 100, "trtllm": 30},
    "size_vs_bf16": {"trtllm": 0.3},
    "timings_seconds": {"load": 1.0},
    "export_seconds": {"trtllm": None},
    "qad": None,
    "accuracy": None,
    "config": {},
}


def test_round_trip_and_markdown(tmp_path):
    report = Report.from_dict({**REPORT, "recipe": {"seed": 0}})
    report.save(tmp_path)
    assert Report.load(tmp_path) == report
    markdown = (tmp_path / "report.md").read_text()
    assert "written layer by layer" in markdown and "`model.layers.*.mlp.gate`" in markdown


def test_a_report_written_before_recipes_still_reads(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    assert Report.load(tmp_path).recipe == {}


@pytest.mark.parametrize(
    "content,fragment",
    [(None, "cannot read"), ("{", "cannot read"), ("[]", "not a convert report"), ('{"scheme": "nvfp4"}', "without")],
)
def test_unreadable_reports_are_one_error_naming_the_file(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    with pytest.raises(UserError, match=fragment) as caught:
        Report.load(tmp_path)
    assert "report.json" in str(caught.value)
