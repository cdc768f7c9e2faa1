"""The core must not depend on torch: kvcached links libtorch and breaks with "undefined
symbol" at every torch ABI change."""

from __future__ import annotations

import subprocess

import vmkv.vmm_ops._C as core
from conftest import run_python


def test_extension_links_neither_torch_nor_a_driver():
    needed = subprocess.run(
        ["readelf", "-d", core.__file__], capture_output=True, text=True, check=True
    ).stdout
    libraries = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert libraries, needed
    assert not [
        lib for lib in libraries if "torch" in lib or "c10" in lib or "cuda" in lib or "ascend" in lib
    ]


def test_core_and_allocator_import_without_torch():
    code = (
        "import sys\n"
        "import vmkv.vmm_ops, vmkv.allocator, vmkv.cli\n"
        "vmm = vmkv.vmm_ops.open_vmm('host')\n"
        "print('torch' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
