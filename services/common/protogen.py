"""Generate the Python gRPC stubs from proto/ into services/common/pb (one shared module).

Run ``python -m services.common.protogen`` after editing a .proto file; a test regenerates into a
temporary folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PB_DIR = Path(__file__).resolve().parent / "pb"
# protoc writes absolute imports of the proto package; the stubs live inside services.common.pb.
_IMPORT = re.compile(r"^from dataengine\.v1 import ", re.MULTILINE)


def generate(out_dir: Path = PB_DIR) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every proto into ``out_dir``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    protos = sorted(PROTO_ROOT.glob("dataengine/v1/*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}/dataengine/v1")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for src in sorted((Path(tmp) / "dataengine" / "v1").glob("*.py*")):
            text = _IMPORT.sub("from services.common.pb import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    (out_dir / "__init__.py").write_text('"""Generated gRPC stubs; edit proto/ and regenerate."""\n')
    return written


def main() -> None:
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PB_DIR):
        print(path)


if __name__ == "__main__":
    main()
