"""Generate the Python gRPC stubs in qllm/v1 from protos/qllm/v1/*.proto.

`python scripts/gen_protos.py` rewrites them; `--check` regenerates into a temporary folder and exits 1
when the committed stubs differ (CI runs the check, so stale stubs fail the build).
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE_DIR = pathlib.Path("qllm") / "v1"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted((PROTO_DIR / PACKAGE_DIR).glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out_dir / PACKAGE_DIR).glob("*_pb2*.py*"))
    return [p.relative_to(out_dir) for p in generated]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        files = generate(ROOT)
        print(f"generated {len(files)} files in {PACKAGE_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        files = generate(tmp_path)
        committed = {p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).glob("*_pb2*.py*")}
        stale = [str(p) for p in files if not (ROOT / p).exists() or not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
        extra = sorted(str(p) for p in committed - set(files))
        if stale or extra:
            print("stale generated stubs; run `make protos`:", ", ".join(stale + extra), file=sys.stderr)
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
