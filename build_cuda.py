"""Build of the CUDA extension ``recon_kernels._cuda`` (kept out of setup.py so it stays short).

The extension does not link libtorch: ``csrc/*.cu`` are compiled by nvcc, ``csrc/bindings.cpp``
by the host C++ compiler with pybind11's headers, and the objects are linked against the
static CUDA runtime only. One build therefore works with any installed torch version.
The compile runs through a generated ninja file, in parallel (``MAX_JOBS`` caps the jobs).

Environment:

* ``RECON_BUILD_CUDA=auto|0|1`` (default auto: build when nvcc is found);
* ``RECON_CUDA_ARCHS`` (default ``80;90a``): SASS targets; PTX of the highest portable arch
  is embedded too so that newer GPUs can JIT it;
* ``NVCC`` / ``CUDA_HOME``: where to find nvcc (else ``PATH``); ``CXX``: host compiler.

Per-object compiler output (including ``ptxas -v`` register/spill reports) is kept next to
each object as ``<object>.log``; ``tests/test_cuda_static.py`` reads those logs.

The same sources also build, with the host compiler alone and ``RECON_EMULATE`` defined, into
a test-only module ``recon_kernels._cuda_emu`` that runs the kernels on the CPU
(``build_emulator``; see csrc/emulator.h).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
DEFAULT_ARCHS = "80;90a"
BUILD_DIR = os.path.join(HERE, "build", "cuda")


def _log(msg: str) -> None:
    print(f"[recon-kernels build] {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """nvcc from $NVCC, $CUDA_HOME/bin, then PATH (None if none is found)."""
    for cand in (
        os.environ.get("NVCC"),
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        if os.environ.get("CUDA_HOME")
        else None,
        shutil.which("nvcc"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.realpath(cand)
    return None


def cuda_root(nvcc: str) -> str:
    """The toolkit directory of nvcc (nvcc may be a wrapper script outside the toolkit)."""
    cands = [os.path.dirname(os.path.dirname(nvcc))]
    try:  # nvcc itself knows: "#$ TOP=/usr/local/cuda-13.0/bin/.."
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
        if m:
            cands.insert(0, os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    cands += [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    for root in cands:
        if root and _cuda_paths_in(root)[0]:
            return root
    return cands[0]


def _cuda_paths_in(root: str) -> tuple[str | None, str | None]:
    incs = [os.path.join(root, "include"), os.path.join(root, "targets", "x86_64-linux", "include")]
    libs = [
        os.path.join(root, "lib64"),
        os.path.join(root, "lib"),
        os.path.join(root, "targets", "x86_64-linux", "lib"),
        os.path.join(root, "targets", "sbsa-linux", "lib"),
    ]
    inc = next((d for d in incs if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)
    lib = next((d for d in libs if os.path.isfile(os.path.join(d, "libcudart_static.a"))), None)
    return inc, lib


def _cuda_paths(nvcc: str) -> tuple[str, str]:
    """(include dir, library dir holding libcudart_static.a) of the toolkit owning nvcc."""
    root = cuda_root(nvcc)
    inc, lib = _cuda_paths_in(root)
    if inc is None or lib is None:
        raise SystemExit(
            f"CUDA toolkit of {nvcc} not found (looked in {root}): need cuda_runtime_api.h "
            "and libcudart_static.a; set CUDA_HOME"
        )
    return inc, lib


def parse_archs(spec: str) -> list[str]:
    archs = [a.strip().replace("sm_", "").replace("compute_", "") for a in spec.split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs):
        raise SystemExit(
            f"RECON_CUDA_ARCHS: expected a ';'-separated list like '80;90a', got {spec!r}"
        )
    return archs


def nvcc_arch_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    portable = [a for a in archs if a.isdigit()]
    if portable:  # PTX for GPUs newer than every listed arch (JIT-compiled by the driver)
        top = max(portable, key=int)
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


def _sources() -> tuple[list[str], str]:
    cus = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    return cus, os.path.join(CSRC, "bindings.cpp")


def _python_includes() -> list[str]:
    import pybind11

    return [pybind11.get_include(), sysconfig.get_paths()["include"]]


def _q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _ninja_exe() -> str:
    exe = shutil.which("ninja")
    if exe is None:
        try:
            import ninja  # the PyPI wheel ships the binary

            exe = os.path.join(ninja.BIN_DIR, "ninja")
        except ImportError:
            exe = None
    if exe is None:
        raise SystemExit("building the CUDA extension needs ninja: pip install ninja")
    return exe


def _write_ninja(builddir: str, rules: dict[str, str], builds: list[tuple]) -> None:
    lines = ["ninja_required_version = 1.3", ""]
    for name, command in rules.items():
        lines += [f"rule {name}", f"  command = {command}"]
        if name != "link":
            lines += ["  depfile = $out.d", "  deps = gcc"]
        lines += [f"  description = {name} $out", ""]
    for out, rule, ins in builds:
        lines.append(f"build {out}: {rule} {' '.join(ins)}")
    text = "\n".join(lines) + "\n"
    path = os.path.join(builddir, "build.ninja")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # unchanged file: ninja's incremental state stays valid
        with open(path, "w") as f:
            f.write(text)


def _run_ninja(builddir: str) -> None:
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
    cmd = [_ninja_exe(), "-C", builddir, "-j", jobs]
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"CUDA extension build failed (ninja exit {proc.returncode})")
    _log(f"ninja -j {jobs} in {builddir}: {time.time() - t0:.1f} s")


def warnings_in_logs(builddir: str) -> list[str]:
    """Compiler warning lines found in the per-object logs of a build."""
    found = []
    for log in sorted(glob.glob(os.path.join(builddir, "*.log"))):
        for line in open(log, errors="replace"):
            if re.search(r"\bwarning\b", line, re.I) and "ptxas info" not in line:
                found.append(f"{os.path.basename(log)}: {line.rstrip()}")
    return found


def build_extension(builddir: str = BUILD_DIR, archs: str | None = None) -> str:
    """Compile recon_kernels._cuda into builddir; returns the path of the shared library."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (set CUDA_HOME or NVCC, or put nvcc on PATH)")
    arch_list = parse_archs(archs or os.environ.get("RECON_CUDA_ARCHS", DEFAULT_ARCHS))
    os.makedirs(builddir, exist_ok=True)
    cuda_inc, cuda_lib = _cuda_paths(nvcc)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    archs_define = "-DRK_CUDA_ARCHS=" + shlex.quote('"' + ";".join(arch_list) + '"')
    nvcc_flags = [
        "-std=c++17",
        "-O3",
        "-lineinfo",  # source lines in compute-sanitizer reports; no runtime cost
        "-Xcompiler",
        "-fPIC,-fvisibility=hidden,-Wall",
        "-Xptxas",
        "-v",  # register / spill report per kernel, kept in the object's .log
        *nvcc_arch_flags(arch_list),
        f"-I{CSRC}",
    ]
    cxx_flags = [
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        *[f"-I{d}" for d in _python_includes()],
        f"-I{cuda_inc}",
        f"-I{CSRC}",
    ]
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = f"_cuda{ext}"
    ldflags = [
        "-shared",
        f"-L{cuda_lib}",
        "-l:libcudart_static.a",
        "-Wl,--exclude-libs,ALL",  # keep the static runtime's symbols private
        "-ldl",
        "-lrt",
        "-lpthread",
    ]
    rules = {
        "nvcc": f"{shlex.quote(nvcc)} {_q(nvcc_flags)} {archs_define} -MD -MF $out.d -c $in -o $out"
        " > $out.log 2>&1 || (cat $out.log; exit 1)",
        "cxx": f"{shlex.quote(cxx)} {_q(cxx_flags)} {archs_define} -MMD -MF $out.d -c $in -o $out"
        " > $out.log 2>&1 || (cat $out.log; exit 1)",
        "link": f"{shlex.quote(cxx)} $in -o $out {_q(ldflags)}",
    }
    cus, binding = _sources()
    builds = []
    objs = []
    for src in cus:
        obj = os.path.splitext(os.path.basename(src))[0] + ".o"
        builds.append((obj, "nvcc", [src]))
        objs.append(obj)
    builds.append(("bindings.o", "cxx", [binding]))
    objs.append("bindings.o")
    builds.append((target, "link", objs))
    _write_ninja(builddir, rules, builds)
    _log(f"building {target} with {nvcc} for sm {', '.join(arch_list)}")
    _run_ninja(builddir)
    for w in warnings_in_logs(builddir):
        _log(f"WARNING {w}")
    return os.path.join(builddir, target)


def build_emulator(builddir: str) -> str:
    """Compile the CPU emulation module _cuda_emu (host compiler only); returns its path.

    Needs the CUDA headers for the fp16/bf16 types (the toolkit of nvcc, or CUDA_HOME)."""
    nvcc = find_nvcc()
    root = cuda_root(nvcc) if nvcc else os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cuda_inc = _cuda_paths_in(root)[0] or os.path.join(root, "include")
    if not os.path.isfile(os.path.join(cuda_inc, "cuda_fp16.h")):
        raise RuntimeError(f"CUDA headers (cuda_fp16.h) not found under {cuda_inc}")
    os.makedirs(builddir, exist_ok=True)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    flags = [
        "-std=c++17",
        "-O1",
        "-g0",
        "-fPIC",
        "-fvisibility=hidden",
        "-fno-strict-aliasing",
        "-Wall",
        "-Wno-unknown-pragmas",  # #pragma unroll is for nvcc
        "-DRECON_EMULATE",
        *[f"-I{d}" for d in _python_includes()],
        f"-I{cuda_inc}",
        f"-I{CSRC}",
    ]
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = f"_cuda_emu{ext}"
    rules = {
        "cxx": f"{shlex.quote(cxx)} {_q(flags)} -MMD -MF $out.d -x c++ -c $in -o $out"
        " > $out.log 2>&1 || (cat $out.log; exit 1)",
        "link": f"{shlex.quote(cxx)} $in -o $out -shared",
    }
    cus, binding = _sources()
    builds, objs = [], []
    for src in [*cus, binding]:
        obj = os.path.splitext(os.path.basename(src))[0] + ".o"
        builds.append((obj, "cxx", [src]))
        objs.append(obj)
    builds.append((target, "link", objs))
    _write_ninja(builddir, rules, builds)
    _run_ninja(builddir)
    return os.path.join(builddir, target)


def cuda_build_config():
    """(ext_modules, cmdclass) for setup(): the extension when it should and can be built."""
    mode = os.environ.get("RECON_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RECON_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    sources, binding = _sources()
    if mode == "0":
        _log("RECON_BUILD_CUDA=0: installing the pure-Python package only")
        return [], {}
    nvcc = find_nvcc()
    if not sources or nvcc is None:
        why = "no CUDA sources in csrc/" if not sources else "nvcc not found"
        if mode == "1":
            raise SystemExit(f"RECON_BUILD_CUDA=1 but the extension cannot be built: {why}")
        _log(f"not building the CUDA extension ({why}); installing pure Python")
        return [], {}

    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    class NinjaBuildExt(build_ext):
        """Builds recon_kernels._cuda with build_extension() above instead of distutils."""

        def build_extension(self, ext):
            if ext.name != "recon_kernels._cuda":
                return super().build_extension(ext)
            t0 = time.time()
            built = build_extension()
            dest = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(built, dest)
            _log(f"CUDA extension built in {time.time() - t0:.1f} s -> {dest}")

    # (setuptools wants paths relative to setup.py; the real build uses build_extension())
    rel = [os.path.relpath(p, HERE).replace(os.sep, "/") for p in (*sources, binding)]
    ext = Extension("recon_kernels._cuda", sources=rel)
    return [ext], {"build_ext": NinjaBuildExt}


def main(argv: list[str] | None = None) -> int:
    """``python build_cuda.py [--archs 90a]``: build the extension and copy it into
    recon_kernels/ (an in-place build without setuptools, for machines whose setuptools is
    too old to read pyproject.toml, such as a fixed GPU image)."""
    import argparse

    ap = argparse.ArgumentParser(description="build recon_kernels._cuda in place")
    ap.add_argument("--archs", default=None, help=f"SASS targets (default {DEFAULT_ARCHS})")
    ap.add_argument("--builddir", default=BUILD_DIR)
    args = ap.parse_args(argv)
    t0 = time.time()
    built = build_extension(args.builddir, args.archs)
    dest = os.path.join(HERE, "recon_kernels", os.path.basename(built))
    shutil.copyfile(built, dest)
    _log(f"CUDA extension built in {time.time() - t0:.1f} s -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
