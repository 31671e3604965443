"""Build glue that pyproject.toml cannot express: the cffi modules (walker, KVM exit path,
unicorn memory hooks) and the
guest payload ELFs."""
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithGuests(build_py):
    """Build guest_images with the host gcc and ship the ELFs as vmm/images package data."""

    def run(self):
        super().run()
        out = ROOT / "guest_images" / "out"
        if shutil.which("make") and shutil.which("gcc"):
            subprocess.run(["make", "-s", "-C", str(ROOT / "guest_images")], check=True)
        target = Path(self.build_lib) / "vmm" / "images"
        target.mkdir(parents=True, exist_ok=True)
        for elf in out.glob("*.elf"):
            shutil.copy2(elf, target / elf.name)


setup(cffi_modules=["vmm/walker/build.py:ffibuilder", "vmm/backends/kvm_build.py:ffibuilder",
                   "vmm/backends/emu_build.py:ffibuilder", "vmm/backends/frames_build.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithGuests})
