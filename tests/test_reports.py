import json
from pathlib import Path

from gateway.reports import write_json_report


def test_report_is_utf8_json_in_a_new_folder(tmp_path: Path):
    path = tmp_path / "nested" / "report.json"
    report = {"metrics": {"recall": 0.5}, "target": "Zoë Müller", "data": tmp_path}
    assert write_json_report(path, report) == path
    text = path.read_text(encoding="utf-8")
    # Readable non-ASCII, a path written as its string, and a trailing newline.
    assert "Zoë Müller" in text and text.endswith("}\n")
    assert json.loads(text) == {**report, "data": str(tmp_path)}
