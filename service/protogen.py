"""Builds everything that comes from proto/: Python modules, the descriptor set, the lint run.

The Python modules are checked in under ``service/gen`` so that installing the project needs no
code generation; ``python -m service.protogen --check`` (run by the tests) fails when they are
out of date. The descriptor set for Envoy's gRPC-JSON transcoder is built at start-up into the
state directory, never checked in. googleapis protos come from googleapis-common-protos and the
well-known types from grpcio-tools, so nothing is fetched.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
GEN_DIR = REPO_ROOT / "service" / "gen"
GEN_PACKAGE = "service.gen"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def include_paths() -> list[Path]:
    import google.api.annotations_pb2 as annotations
    import grpc_tools

    googleapis_root = Path(annotations.__file__).resolve().parents[2]  # holds google/api/*.proto
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    return [PROTO_ROOT, googleapis_root, well_known]


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    argv = ["protoc", *(f"-I{p}" for p in include_paths()), *args]
    argv += [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    # Names relative to proto/ are looked up on the include paths, whatever the working
    # directory; they also become the file names inside the descriptors.
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv[1:])}")


def build_descriptor_set(out_path: Path) -> Path:
    """Write a FileDescriptorSet with imports and source info (what Envoy's transcoder needs)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _protoc(["--include_imports", "--include_source_info", f"--descriptor_set_out={out_path}"])
    return out_path


def generate_python(out_dir: Path) -> None:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py into ``out_dir`` (a package dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"])
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(tmp, out_dir)
    # protoc writes absolute imports of the proto package ("from cosyvoice.v1 import x_pb2");
    # make them point inside service.gen so that nothing has to be put on sys.path.
    pattern = re.compile(r"^from cosyvoice(\.\S+)? import ", re.MULTILINE)
    for path in out_dir.rglob("*.py*"):
        text = path.read_text()
        path.write_text(pattern.sub(lambda m: f"from {GEN_PACKAGE}.cosyvoice{m[1] or ''} import ",
                                    text))
    for package_dir in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        (package_dir / "__init__.py").write_text("")
    (out_dir / "__init__.py").write_text(
        '"""Generated from proto/ by `python -m service.protogen`; do not edit."""\n'
    )


def _differences(expected: Path, actual: Path) -> list[str]:
    diffs: list[str] = []
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {p.relative_to(actual) for p in actual.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts}
    diffs += [f"missing: {p}" for p in sorted(expected_files - actual_files)]
    diffs += [f"not generated from proto/: {p}" for p in sorted(actual_files - expected_files)]
    for rel in sorted(expected_files & actual_files):
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            diffs.append(f"out of date: {rel}")
    return diffs


def check_generated() -> list[str]:
    """Regenerate into a temporary dir and list how service/gen differs (empty: current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate_python(fresh)
        return _differences(fresh, GEN_DIR)


def find_buf() -> Path:
    candidate = Path(sys.executable).parent / "buf"
    found = candidate if candidate.exists() else shutil.which("buf")
    if not found:
        raise FileNotFoundError("buf not found: install the test extras (buf-bin)")
    return Path(found)


def lint() -> subprocess.CompletedProcess:
    """Run `buf lint` over our files (the googleapis imports are resolved by protoc)."""
    with tempfile.TemporaryDirectory() as tmp:
        image = build_descriptor_set(Path(tmp) / "image.binpb")
        return subprocess.run(
            [str(find_buf()), "lint", str(image), "--path", "cosyvoice",
             "--config", str(REPO_ROOT / "buf.yaml")],
            capture_output=True, text=True, cwd=REPO_ROOT,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if service/gen is not what proto/ generates")
    parser.add_argument("--lint", action="store_true", help="run buf lint on proto/")
    parser.add_argument("--descriptor-out", type=Path,
                        help="also write the descriptor set for Envoy to this path")
    args = parser.parse_args(argv)
    if args.lint:
        result = lint()
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    if args.check:
        diffs = check_generated()
        for line in diffs:
            print(line, file=sys.stderr)
        if diffs:
            print("service/gen is stale: run scripts/gen_proto.sh", file=sys.stderr)
        return 1 if diffs else 0
    generate_python(GEN_DIR)
    if args.descriptor_out:
        build_descriptor_set(args.descriptor_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
