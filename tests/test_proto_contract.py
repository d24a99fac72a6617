"""The proto contract check (scripts/check-proto: buf lint + buf breaking against the released
API image) on copies of proto/: the unmodified copy and an additive change pass, while a
deleted field, a changed field type and a lint violation fail with buf's rule named; and the
googleapis files proto/google/rpc ships describe the error details the server sends."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_tools import protoc

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


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str
) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of a file, nested ones included, by full name."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    for m in messages:
        found[prefix + m.name] = m
        found.update(_messages(list(m.nested_type), f"{prefix}{m.name}."))
    return found


def test_shipped_google_rpc_matches_what_the_server_sends(tmp_path: Path) -> None:
    # The server serializes its details with googleapis-common-protos; a client decodes them
    # with proto/google/rpc. Every field number both know must mean the same field (the
    # installed package may be older or newer than the shipped copy), and the fields the
    # server sets must be in the shipped copy.
    out = tmp_path / "google-rpc.binpb"
    wkt = resources.files("grpc_tools") / "_proto"
    assert protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"-I{wkt}", f"--descriptor_set_out={out}",
        "google/rpc/status.proto", "google/rpc/error_details.proto",
    ]) == 0
    shipped: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        assert "Licensed under the Apache License, Version 2.0" in (
            ROOT / "proto" / file.name
        ).read_text(), file.name
        shipped.update(_messages(list(file.message_type), "google.rpc."))
    server: dict[str, descriptor_pb2.DescriptorProto] = {}
    for module in (status_pb2, error_details_pb2):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        server.update(_messages(list(file.message_type), "google.rpc."))

    def shape(f: descriptor_pb2.FieldDescriptorProto | None) -> tuple[object, ...] | None:
        return None if f is None else (f.number, f.name, f.type, f.label, f.type_name)

    for name in sorted(shipped.keys() & server.keys()):
        by_number = {f.number: f for f in shipped[name].field}
        by_name = {f.name: f for f in shipped[name].field}
        for f in server[name].field:
            if f.number in by_number or f.name in by_name:
                assert shape(by_number.get(f.number)) == shape(f), f"{name} field {f.number}"
                assert shape(by_name.get(f.name)) == shape(f), f"{name}.{f.name}"
    sent = {
        "google.rpc.Status": {"code", "message", "details"},
        "google.rpc.ErrorInfo": {"reason", "domain", "metadata"},
        "google.rpc.BadRequest": {"field_violations"},
        "google.rpc.BadRequest.FieldViolation": {"field", "description"},
    }
    for name, fields in sent.items():
        assert fields <= {f.name for f in shipped[name].field}, name
