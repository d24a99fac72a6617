"""The proto contract check (scripts/check-proto: buf lint + buf breaking against the released
API image) on copies of proto/: the unmodified copy and an additive change pass, while a
deleted field, a changed field type and a lint violation fail with buf's rule named."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_PROTO = ROOT / "scripts" / "check-proto"
CREDITS_PROTO = Path("credits") / "v1" / "credits.proto"


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    """A copy of proto/ (buf.yaml and the .proto files) that a test may edit."""
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy, ignore=shutil.ignore_patterns("released"))
    return copy


def check_proto(proto_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHECK_PROTO), "--proto-dir", str(proto_dir)],
        capture_output=True, text=True, timeout=110, check=False,
    )


def edit(proto_dir: Path, old: str, new: str) -> None:
    """Replaces the one occurrence of `old` in the copied credits.proto."""
    path = proto_dir / CREDITS_PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"expected exactly one {old!r} in {path}"
    path.write_text(text.replace(old, new))


def test_unmodified_proto_passes(proto_copy: Path) -> None:
    result = check_proto(proto_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_adding_a_field_is_not_breaking(proto_copy: Path) -> None:
    edit(
        proto_copy,
        "  google.protobuf.Timestamp consume_time = 7;\n}",
        "  google.protobuf.Timestamp consume_time = 7;\n  // A later addition.\n"
        "  string note = 8;\n}",
    )
    result = check_proto(proto_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deleting_a_field_is_breaking(proto_copy: Path) -> None:
    edit(proto_copy, "  optional int64 amount = 4;\n  // Idempotency", "  // Idempotency")
    result = check_proto(proto_copy)
    assert result.returncode != 0
    assert 'Previously present field "4" with name "amount" on message "ConsumeRequest"' in (
        result.stdout
    ), result.stdout + result.stderr


def test_changing_a_field_type_is_breaking(proto_copy: Path) -> None:
    edit(proto_copy, "  int64 amount = 2;\n  // When the credits expire.",
         "  int32 amount = 2;\n  // When the credits expire.")
    result = check_proto(proto_copy)
    assert result.returncode != 0
    assert 'Field "2" with name "amount" on message "GrantRequest" changed type' in (
        result.stdout
    ), result.stdout + result.stderr


def test_lint_violation_fails(proto_copy: Path) -> None:
    # A camelCase field is additive (not breaking) but breaks the STANDARD lint rules.
    edit(
        proto_copy,
        "  google.protobuf.Timestamp consume_time = 7;\n}",
        "  google.protobuf.Timestamp consume_time = 7;\n  // Badly named.\n"
        "  string badName = 8;\n}",
    )
    result = check_proto(proto_copy)
    assert result.returncode != 0
    assert 'Field name "badName" should be lower_snake_case' in result.stdout, (
        result.stdout + result.stderr
    )
